#!/bin/bash
# A direct drain, for A/B checks of the worker's hot path (what found this round's drain
# regression): a fresh database, N no-op actions enqueued, one `worker --burst`, then the
# drain time from the first started_at to the last finished_at, and the worker's CPU.
# (For the server's side, set log_min_duration_statement = 0 on the run's database and
# sum the claim and outcome statements' durations from the server log.)
#
#   CONC=100 bench/drain.sh TREE [N]       # TREE: a checkout (e.g. a git worktree)
#   PROC=bench_noop_async ...              # the async no-op processor instead
#
# Interleave two trees (A B A B) and compare; single runs vary by 10-30 % here.
set -eu
T=$(cd "$1" && pwd); N=${2:-20000}
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
DB=drain_$$
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $DB"
trap 'psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB"' EXIT
URL=postgresql+psycopg://postgres@127.0.0.1:5432/$DB
cd "$T"
export PYTHONPATH=$T ASYNCACTIONS_DATABASE_URL=$URL
"$PY" -m asyncactions --config bench/asyncactions.toml db upgrade >/dev/null
"$PY" -c "import sqlalchemy as sa, asyncactions, bench.noop
asyncactions.init_actions(sa.create_engine('$URL'), '${PROC:-bench_noop}', [{'i': i} for i in range($N)])"
psql -q -h 127.0.0.1 -U postgres -d "$DB" -c "CHECKPOINT" >/dev/null
/usr/bin/time -f "worker_cpu_s user %U sys %S" "$PY" -m asyncactions --config bench/asyncactions.toml \
    worker --processors "${PROC:-bench_noop}" --concurrency "${CONC:-10}" --burst 2>&1 >/dev/null | grep worker_cpu
psql -q -h 127.0.0.1 -U postgres -d "$DB" -At -F ' ' -c "SELECT 'drain_s', extract(epoch FROM max(finished_at) - min(started_at)), count(*) FROM async_action WHERE status = 'completed'"
