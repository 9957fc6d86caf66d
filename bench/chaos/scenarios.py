"""The chaos scenarios. Each runs on a PostgreSQL cluster of its own with real worker
processes, and returns its figures with `ok` (see harness.verdict): every action final,
none lost, none running, and runs beyond one per action within what was in flight at
the faults. `short` is the form CI runs; the long form is the issue's.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from asyncactions.claiming import PREFETCH, set_claim_session

from .harness import Run, cluster, free_port, host, log, verdict, wait_until

Figures = dict[str, Any]


def _held_by(run: Run, pid: int) -> int:
    """Actions the (stopped) worker `pid` holds running: what its death can run twice."""
    return run.query("SELECT count(*) FROM async_action WHERE status = 'running' "
                     "AND claimed_by LIKE %s", [f"%:{pid}:%"])[0][0]


def _freeze_and_kill(run: Run, proc: subprocess.Popen[bytes]) -> int:
    """SIGSTOP (it can claim and record nothing more), count what it holds, SIGKILL."""
    proc.send_signal(signal.SIGSTOP)
    held = _held_by(run, proc.pid)
    run.kill(proc)
    return held


def repeated_kills(short: bool) -> Figures:
    """3 workers; every 2-5 s (short: 1-2 s) a random one is SIGKILLed and a new one
    started, while the actions flow."""
    n, duration, gaps = (2_000, 10.0, (1.0, 2.0)) if short else (20_000, 60.0, (2.0, 5.0))
    rng = random.Random(20261206)
    with cluster() as c:
        run = Run(c.url(), lease="3s")
        try:
            run.enqueue("chaos", n)
            for _ in range(3):
                run.start_worker()
            kills, in_flight, end = 0, 0, time.monotonic() + duration
            while time.monotonic() < end:
                time.sleep(rng.uniform(*gaps))  # the fault schedule itself
                in_flight += _freeze_and_kill(run, rng.choice(run.live_workers()))
                kills += 1
                run.start_worker()
            started = time.monotonic()
            run.drained(n, timeout=300)
            return verdict(run, n, in_flight, kills=kills,
                           drain_after_last_kill_s=round(time.monotonic() - started, 1))
        finally:
            run.close()


def database_restarts(short: bool) -> Figures:
    """PostgreSQL restarted under load, `fast` then `immediate` mode, twice each."""
    n = 3_000 if short else 20_000
    with cluster() as c:
        run = Run(c.url(), lease="3s", work=0.005)
        try:
            run.enqueue("chaos", n)
            workers = [run.start_worker() for _ in range(2)]
            outages = []
            for mode in ("fast", "immediate") * 2:
                wait_until(lambda: len(run.ledger_runs()) > 0, 60, "work to start")
                time.sleep(1.0 if short else 3.0)  # under load: the fault schedule
                before = time.monotonic()
                c.pg_ctl("-m", mode, "restart")
                outages.append(round(time.monotonic() - before, 2))
            run.drained(n, timeout=300)
            alive = run.survivors(workers)
            # What can run twice: every attempt the workers held at each restart.
            bound = 4 * len(workers) * run.concurrency * PREFETCH
            figures = verdict(run, n, bound, restarts=4, restart_seconds=outages,
                              workers_survived=alive)
            figures["ok"] = figures["ok"] and alive
            return figures
        finally:
            run.close()


def backend_terminations(short: bool) -> Figures:
    """Every worker backend terminated (pg_terminate_backend) in a loop."""
    n, duration = (3_000, 8.0) if short else (20_000, 30.0)
    with cluster() as c:
        run = Run(c.url(), lease="3s", work=0.005)
        try:
            run.enqueue("chaos", n)
            workers = [run.start_worker() for _ in range(2)]
            rounds, end = 0, time.monotonic() + duration
            while time.monotonic() < end:
                c.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                      "backend_type = 'client backend' AND pid <> pg_backend_pid()")
                rounds += 1
                time.sleep(0.5)
            run.drained(n, timeout=300)
            alive = run.survivors(workers)
            bound = rounds * len(workers) * run.concurrency * PREFETCH
            figures = verdict(run, n, bound, termination_rounds=rounds, workers_survived=alive)
            figures["ok"] = figures["ok"] and alive
            return figures
        finally:
            run.close()


def pool_exhaustion(short: bool) -> Figures:
    """max_connections too low for every worker's pool: they wait and retry. The workers
    start while every connection their role can have is taken, for longer than a lease:
    a worker waits out a full server however long that lasts, and starts."""
    n = 2_000 if short else 10_000
    lease = 5.0
    # Five connections, one of them reserved for superusers (the harness, to watch):
    # four for three workers that each keep two open (claim, outcomes) and want more.
    with cluster("max_connections = 5", "superuser_reserved_connections = 1") as c:
        c.sql("CREATE ROLE app LOGIN")
        worker_url = c.url().replace("postgres@", "app@")
        run = Run(c.url(), lease=f"{lease:.0f}s", concurrency=8, work=0.01,
                  worker_url=worker_url)
        c.sql("GRANT ALL ON ALL TABLES IN SCHEMA public TO app; "
              "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app")
        hogs = [psycopg.connect(worker_url.replace("+psycopg", "")) for _ in range(4)]
        try:
            run.enqueue("chaos", n)
            workers = [run.start_worker() for _ in range(3)]

            def was_refused(i: int) -> bool:
                text = (run.dir / f"worker{i}.log").read_text()
                return "too many clients" in text or "connection slots are reserved" in text
            wait_until(lambda: all(map(was_refused, range(3))), 60, "every worker refused")
            time.sleep(1.5 * lease)  # the fault: the server stays full for 1.5 leases
            for hog in hogs:
                hog.close()
            run.drained(n, timeout=300)
            refused = sum(map(was_refused, range(len(workers))))
            alive = run.survivors(workers)
            figures = verdict(run, n, 0, max_connections=5, workers=3,
                              workers_that_saw_refusals=refused, workers_survived=alive)
            figures["ok"] = figures["ok"] and alive and refused > 0  # it was exhausted
            return figures
        finally:
            for hog in hogs:
                hog.close()
            run.close()


def retry_storm(short: bool) -> Figures:
    """Actions failing again and again with a zero retry interval must not starve a
    healthy processor: its pickup (enqueue to start) p99 stays under a second."""
    storm, healthy, seconds = (2_000, 100, 5.0) if short else (10_000, 600, 30.0)
    with cluster() as c:
        run = Run(c.url(), lease="5s")
        try:
            run.enqueue("storm", storm)
            run.start_worker()
            wait_until(lambda: run.statuses().get("running", 0) > 0, 60, "the storm")
            from asyncactions import init_action
            from asyncactions.database import make_engine

            engine = make_engine(run.url)
            enqueued: dict[int, float] = {}
            gap = seconds / healthy
            for _ in range(healthy):
                action = init_action(engine, "healthy", {})
                enqueued[action.id] = time.time()
                time.sleep(gap)  # a steady trickle: the load itself
            engine.dispose()

            def all_started() -> bool:
                return len(run.ledger_runs(set(enqueued))) == len(enqueued)

            wait_until(all_started, 120, "every healthy action to start")
            starts: dict[int, float] = {}
            for line in run.ledger.read_text().splitlines():
                action_id, _attempt, _pid, at = line.split()
                if int(action_id) in enqueued:
                    starts.setdefault(int(action_id), float(at))
            pickups = sorted(starts[i] - enqueued[i] for i in enqueued)
            p99 = pickups[min(len(pickups) - 1, int(len(pickups) * 0.99))]
            storm_attempts = run.statuses()
            return {"storm_actions": storm, "healthy_actions": healthy,
                    "healthy_pickup_p50_ms": round(pickups[len(pickups) // 2] * 1000, 1),
                    "healthy_pickup_p99_ms": round(p99 * 1000, 1),
                    # Slowest ones 1/20 s apart (the trickle's gap): the worker stalled.
                    "healthy_slowest_ms": [round(x * 1000, 1) for x in pickups[-5:]],
                    "statuses": storm_attempts, "ok": p99 < 1.0}
        finally:
            run.close()


def leader_failover(short: bool) -> Figures:
    """The worker that fires schedules is killed; another leads within the lease, and
    no fire time is enqueued twice or skipped."""
    lease = 3
    ticks = 8 if short else 30
    with cluster() as c:
        run = Run(c.url(), lease=f"{lease}s",
                  extra_config='[schedules.tick]\nprocessor = "tick"\nevery = "1s"\n')
        try:
            for _ in range(3):
                run.start_worker()
                time.sleep(0.3)  # distinct start times: the leader is the eldest
            count = lambda: len(_fire_times(run))  # noqa: E731
            wait_until(lambda: count() >= 3, 60, "the schedule to fire")
            leader = c.sql("SELECT pid FROM async_action_worker ORDER BY started_at, id "
                           "LIMIT 1")[0][0]
            victim = next(w for w in run.workers if w.pid == leader)
            killed_at = datetime.now().astimezone()
            _freeze_and_kill(run, victim)
            wait_until(lambda: count() >= 3 + ticks, 120, "fires after the failover")
            fires = _fire_times(run)
            steps = {(b - a).total_seconds() for a, b in itertools.pairwise(fires)}
            after = [f for f in fires if f > killed_at]
            first_after = min(after) if after else None
            return {"fire_times": len(fires), "duplicates": len(fires) - len(set(fires)),
                    "gaps": sorted(s for s in steps if s != 1.0),
                    "first_fire_enqueued_after_kill_s": None if first_after is None else
                    round((_enqueued_at(run, first_after) - killed_at).total_seconds(), 2),
                    "lease_s": lease,
                    "ok": len(fires) == len(set(fires)) and steps == {1.0}}
        finally:
            run.close()


def partition(short: bool) -> Figures:
    """A worker on a test host of its own (a network namespace) loses its link for three
    leases while its attempts run: the other worker takes them over after the lease,
    the cut-off worker's late outcomes change nothing (fenced), and it rejoins. One of
    the attempts is a transactional processor's holding a row lock: the server ends
    the cut-off transaction (TCP keepalives, see queries.ends_if_cut_off), so its rerun
    elsewhere gets the row and completes while the link is still cut."""
    lease, held = 3, 4
    with host() as h, cluster(listen=f"127.0.0.1,{h.gateway}") as c:
        run = Run(c.url(), lease=f"{lease}s", concurrency=held)
        try:
            def registered() -> int:
                return run.query("SELECT count(*) FROM async_action_worker")[0][0]
            # The worker on the test host starts first: it leads, and runs every action.
            there = run.start_worker(prefix=h.prefix, url=c.url(h.gateway))
            wait_until(lambda: registered() == 1, 60, "the worker on the test host")
            from asyncactions import init_actions
            from asyncactions.database import make_engine

            with psycopg.connect(run.url.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute("CREATE TABLE chaos_account (bookings integer); "
                             "INSERT INTO chaos_account VALUES (0)")
            engine = make_engine(run.url)
            # Attempts that end inside the cut: their outcomes wait for the link.
            cut_off = [a.id for a in init_actions(engine, "slow",
                                                  [{"seconds": 2 * lease}] * (held - 1))]
            (booking,) = init_actions(engine, "book", [{"seconds": 2 * lease}])
            cut_off.append(booking.id)
            engine.dispose()
            pattern = f"%:{there.pid}:%"
            wait_until(lambda: len(run.ledger_runs()) == held, 60, "its attempts to start")
            here = run.start_worker()
            wait_until(lambda: registered() == 2, 60, "the second worker")
            h.cut()
            cut_at = time.monotonic()

            def taken_over() -> bool:
                return all(not row for row in (run.query(
                    "SELECT 1 FROM async_action WHERE id = %s AND claimed_by LIKE %s",
                    [i, pattern]) for i in cut_off)) and \
                    all(run.ledger_runs()[i] == 2 for i in cut_off)
            wait_until(taken_over, 10 * lease, "the other worker to take over")
            takeover_s = round(time.monotonic() - cut_at, 2)
            booked_s = None  # when the booking's rerun committed, if within the cut
            while time.monotonic() - cut_at < 3 * lease:  # the cut's length
                if booked_s is None and run.query(
                        "SELECT status = 'completed' FROM async_action WHERE id = %s",
                        [booking.id])[0][0]:
                    booked_s = round(time.monotonic() - cut_at, 2)
                time.sleep(0.1)
            h.restore()
            wait_until(lambda: run.query(
                "SELECT count(*) FROM async_action_worker WHERE pid = %s AND "
                "heartbeat_at > now() - interval '2 seconds'", [there.pid])[0][0] == 1,
                60, "the cut-off worker to rejoin")
            rejoined_s = round(time.monotonic() - cut_at, 2)
            run.drained(held, timeout=120)
            finals = run.query("SELECT id, attempts, result, status FROM async_action "
                               "WHERE id = ANY(%s)", [cut_off])
            fenced = all(status == "completed" and attempts == 2 and
                         result == {"pid": here.pid} for _i, attempts, result, status in finals)
            # It rejoined: it runs new work again (more is enqueued until it takes some).
            def ran_by_there() -> bool:
                run.enqueue("chaos", 100)
                return any(int(line.split()[2]) == there.pid for line in
                           run.ledger.read_text().splitlines() if int(line.split()[0]) > held)
            with suppress(TimeoutError):
                wait_until(ran_by_there, 60, "the cut-off worker to run new work", interval=0.5)
            after = {int(line.split()[2]) for line in run.ledger.read_text().splitlines()
                     if int(line.split()[0]) > held}
            booked_once = run.query("SELECT bookings FROM chaos_account")[0][0] == 1
            return {"lease_s": lease, "cut_s": 3 * lease, "held_by_cut_off_worker": held,
                    "taken_over_after_s": takeover_s, "rejoined_after_s": rejoined_s,
                    "late_outcomes_fenced": fenced, "runs_new_work_after": there.pid in after,
                    "transactional_rerun_committed_after_s": booked_s,
                    "cut_off_transaction_rolled_back": booked_once,
                    "ok": fenced and there.pid in after and booked_s is not None
                    and booked_once and run.survivors([here, there])}
        finally:
            run.close()


def _fire_times(run: Run) -> list[datetime]:
    keys = run.query("SELECT unique_key FROM async_action WHERE processor = 'tick' "
                     "ORDER BY unique_key")
    return [datetime.fromisoformat(k.split(":", 2)[2]) for (k,) in keys]


def _enqueued_at(run: Run, fire: datetime) -> datetime:
    return run.query("SELECT created_at FROM async_action WHERE unique_key = %s",
                     [f"schedule:tick:{fire.isoformat()}"])[0][0]


def long_transaction(short: bool) -> Figures:
    """An `idle in transaction` session holding the xmin horizon while actions flow in
    steadily: the worker's own claims (its claim-duration metric, mean per window) stay
    within 3x of their mean before the hold, and afterwards autovacuum reclaims the dead
    rows with the shipped per-table settings. A hold longer than the leader's
    HorizonWatch needs to see it (its threshold and one interval) must be named in the
    worker's log. A walk of the claim index from its front (what every claim cost
    before claim floors) is measured apart, and so are pickups. Autovacuum at
    PostgreSQL's defaults: at a 5 s naptime its passes over a table it can reclaim
    nothing from (the horizon is held) took a core of this 2-core machine."""
    from asyncactions.database import make_engine
    from asyncactions.maintenance import LONG_TRANSACTION, HorizonWatch

    n, hold, before, window = (5_000, 10.0, 5.0, 2.0) if short else (50_000, 120.0, 20.0, 10.0)
    rate = n / hold
    with cluster() as c:
        run = Run(c.url(), lease="10s")
        engine = make_engine(run.url)
        port = free_port()
        flow = Steady(run, engine, "chaos", rate)
        try:
            run.start_worker("--metrics-port", str(port))
            wait_until(lambda: _claims(port), 60, "the worker's metrics", interval=0.2)
            flow.start()
            time.sleep(before / 4)  # the flow settles; then the normal phase is measured
            front_before = _claim_ms(engine, 5)
            measured, start = time.time(), _claims(port)
            time.sleep(before)
            normal_end = _claims(port)
            normal, normal_p99 = _mean_ms(start, normal_end), _p99_bound_ms(start, normal_end)
            pinning = psycopg.connect(run.url.replace("+psycopg", ""))
            pinning.execute("SELECT txid_current()")  # holds a snapshot: xmin stays
            pinned_at, end = time.time(), time.monotonic() + hold
            held_start = last = _claims(port)
            windows = []
            while time.monotonic() < end:
                time.sleep(min(window, max(end - time.monotonic(), 0.0)))
                now = _claims(port)
                windows.append(_mean_ms(last, now))
                last = now
            held, held_p99 = _mean_ms(held_start, last), _p99_bound_ms(held_start, last)
            front_held = _claim_ms(engine, 5)
            pid = pinning.info.backend_pid
            pinning.rollback()
            pinning.close()
            enqueued = flow.stop()
            run.drained(enqueued, timeout=600)
            told = (run.dir / "worker0.log").read_text()
            on, off = "claims start at their floor", "claims walk from the front again"
            switches = [line for line in told.splitlines() if on in line or off in line]
            named = f"transaction of backend pid {pid} " in told and "holds back vacuum" in told
            must_name = hold >= (LONG_TRANSACTION.total_seconds() + HorizonWatch.interval)
            pickups = _pickups_ms(run, measured, pinned_at, pinned_at + hold, flow.urgent)

            def dead() -> int:
                return run.query("SELECT n_dead_tup FROM pg_stat_user_tables "
                                 "WHERE relname = 'async_action'")[0][0]
            try:
                wait_until(lambda: dead() < enqueued // 10, 180, "autovacuum", interval=1.0)
                reclaimed = True
            except TimeoutError:
                reclaimed = False
            worst = max(windows)
            ok = reclaimed and worst <= 3 * normal and (named or not must_name)
            kept = None  # the worker's log goes with the run's directory: kept on a failure
            if not ok:
                kept = str(shutil.copy(run.dir / "worker0.log", Path(tempfile.gettempdir()) /
                                       f"chaos-long_transaction-{os.getpid()}.log"))
            return {"actions": enqueued, "rate_per_s": round(rate), "held_s": hold,
                    "claim_ms_mean_before": round(normal, 3),
                    "claim_ms_mean_held": round(held, 3),
                    "claim_ms_mean_worst_window_held": round(worst, 3),
                    "claim_ms_mean_windows_held": [round(w, 2) for w in windows],
                    "claim_ms_p99_bucket_before_held": [normal_p99, held_p99],
                    "front_walk_ms_before": round(front_before, 3),
                    "front_walk_ms_end_of_hold": round(front_held, 3), **pickups,
                    "dead_rows_after": dead(), "reclaimed_by_autovacuum": reclaimed,
                    "named_in_worker_log": named,
                    "floors_turned_on_off": [sum(on in line for line in switches),
                                             sum(off in line for line in switches)],
                    "floor_switches": switches[:12],
                    "worker_log_kept": kept, "ok": ok}
        finally:
            flow.stop()
            engine.dispose()
            run.close()


class Steady:
    """Enqueues `rate` actions a second on a thread of its own, in a transaction every
    50 ms (an application's outbox under a steady load), and one of priority -1 a
    second: below every claim floor, found only by a walk from the index's front."""

    def __init__(self, run: Run, engine: Any, processor: str, rate: float) -> None:
        self._engine, self._processor, self._rate = engine, processor, rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.enqueued = 0
        self.urgent: set[int] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """Stop; how many it enqueued."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        return self.enqueued

    def _run(self) -> None:
        from asyncactions import init_action, init_actions

        started = time.monotonic()
        while not self._stop.wait(0.05):
            elapsed = time.monotonic() - started
            due = int(elapsed * self._rate) - (self.enqueued - len(self.urgent))
            if due > 0:
                init_actions(self._engine, self._processor, [{}] * due)
                self.enqueued += due
            if len(self.urgent) < elapsed:
                self.urgent.add(init_action(self._engine, self._processor, priority=-1).id)
                self.enqueued += 1


Claims = dict[float, float]  # the claim-duration histogram: count at or under each bound


def _claims(port: int) -> Claims | None:
    """The worker's claim-duration histogram, cumulative counts by upper bound (seconds),
    with the sum of seconds under the key -1."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "asyncactions_claim_duration_seconds":
            counts = {float(s.labels["le"]): s.value for s in family.samples
                      if s.name.endswith("_bucket")}
            counts[-1] = next(s.value for s in family.samples if s.name.endswith("_sum"))
            return counts
    return None


def _mean_ms(start: Claims | None, end: Claims | None) -> float:
    """The mean claim between two reads; infinite if none: the flow never stops, so a
    window without claims is a stalled worker."""
    assert start is not None and end is not None, "the worker's metrics stopped answering"
    count = end[float("inf")] - start[float("inf")]
    return (end[-1] - start[-1]) / count * 1000 if count else float("inf")


def _p99_bound_ms(start: Claims | None, end: Claims | None) -> float:
    """The histogram bucket the 99th percentile claim between two reads falls in (its
    upper bound)."""
    assert start is not None and end is not None, "the worker's metrics stopped answering"
    total = end[float("inf")] - start[float("inf")]
    for bound in sorted(b for b in end if b >= 0):
        if end[bound] - start[bound] >= 0.99 * total:
            return bound * 1000
    return float("inf")


def _pickups_ms(run: Run, measured: float, pinned: float, unpinned: float,
                urgent: set[int]) -> Figures:
    """Enqueue-to-start p50 and p99 of the actions enqueued in the normal phase and
    during the hold, and of the urgent ones (priority -1) apart (first attempts, from
    the ledger the processor writes)."""
    created = dict(run.query("SELECT id, extract(epoch FROM created_at)::float8 "
                             "FROM async_action"))
    before, held, urgent_before, urgent_held = [], [], [], []
    for line in run.ledger.read_text().splitlines():
        action, attempt, _, at = line.split()
        made = created.get(int(action))
        if attempt != "1" or made is None or not measured <= made < unpinned:
            continue
        pickup = (float(at) - made) * 1000
        if int(action) in urgent:
            (urgent_held if made >= pinned else urgent_before).append(pickup)
        else:
            (held if made >= pinned else before).append(pickup)

    def quantile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 1)
    return {"pickup_ms_p50_p99_before": [quantile(before, 0.5), quantile(before, 0.99)],
            "pickup_ms_p50_p99_held": [quantile(held, 0.5), quantile(held, 0.99)],
            "urgent_pickup_ms_p50_max_before": [quantile(urgent_before, 0.5),
                                                quantile(urgent_before, 1.0)],
            "urgent_pickup_ms_p50_max_held": [quantile(urgent_held, 0.5),
                                              quantile(urgent_held, 1.0)]}


def _claim_ms(engine: Any, times: int) -> float:
    """The median time of a claim of the flowing processor from the index's front,
    rolled back: it steps over the entries of the actions claimed since xmin was pinned
    (dead rows no snapshot may yet forget)."""
    from asyncactions import queries

    samples = []
    with engine.connect() as conn:
        set_claim_session(conn)  # the plan a worker's claim gets
        conn.commit()
        for _ in range(times):
            with conn.begin() as tx:
                start = time.perf_counter()
                queries.claim(conn, "chaos-probe", [("chaos", 0)], 10, timedelta(seconds=1))
                samples.append((time.perf_counter() - start) * 1000)
                tx.rollback()
    return sorted(samples)[len(samples) // 2]


SCENARIOS: dict[str, Callable[[bool], Figures]] = {
    "repeated_kills": repeated_kills,
    "database_restarts": database_restarts,
    "backend_terminations": backend_terminations,
    "pool_exhaustion": pool_exhaustion,
    "retry_storm": retry_storm,
    "leader_failover": leader_failover,
    "partition": partition,
    "long_transaction": long_transaction,
}
# The form CI runs: the checks that hold on a busy machine. long_transaction measures
# claim latencies, which only a quiet machine's long form can; retry_storm's pickups,
# with the fair claim, sit far enough under its second (p99 50-170 ms at a load of 4-6
# on 2 cores) to hold there too.
SHORT = ("repeated_kills", "database_restarts", "backend_terminations", "pool_exhaustion",
         "retry_storm", "leader_failover", "partition")


def run_scenario(name: str, short: bool) -> Figures:
    log(f"chaos: {name} ({'short' if short else 'long'})")
    started = time.monotonic()
    figures = SCENARIOS[name](short)
    figures = {"scenario": name, "form": "short" if short else "long", **figures,
               "seconds": round(time.monotonic() - started, 1)}
    log(f"chaos: {name}: {'ok' if figures['ok'] else 'FAILED'} {figures}")
    return figures

