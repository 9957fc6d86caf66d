"""Compare two commits in one interleaved run (A B A B …) and print B/A per figure: the
regression guard to run before any commit that touches the hot path (issue 17).

    python -m bench.compare A B [--scenarios s2kept,s1] [--rounds 3] [-- BENCH.RUN ARGS]

Each commit is checked out into a temporary git worktree; the benchmark harness is this
checkout's bench/ (copied over each worktree's), so both sides are measured by the same
code and only asyncactions differs. Each round runs `python -m bench.run --runs 1` on A,
then on B (in that order, alternating which goes first from round to round), in the
worktree, so the worker processes import that worktree's asyncactions. The table gives
the median of the rounds per side and B/A; for rates higher is better, for times and
latencies lower is. One JSON line per figure goes to --json when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pg import ROOT
from bench.procs import log

# Copied from this checkout into each worktree; the pgqueuer venv is linked, not copied.
BENCH_KEEP_OUT = {".venv-pgqueuer", "results", "__pycache__"}
# Figures that only describe the run, not the code under test.
NOT_COMPARED = {"machine_busy_pct_before"}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@contextmanager
def worktrees(commits: Sequence[str]) -> Iterator[list[Path]]:
    """A detached worktree per commit, with this checkout's bench/ in it."""
    base = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    made: list[Path] = []
    try:
        for i, commit in enumerate(commits):
            path = base / f"{'AB'[i]}-{commit[:10]}"
            _git("worktree", "add", "--detach", "--quiet", str(path), commit)
            made.append(path)
            shutil.rmtree(path / "bench")
            shutil.copytree(ROOT / "bench", path / "bench",
                            ignore=lambda _dir, names: [n for n in names
                                                        if n in BENCH_KEEP_OUT])
            peer_venv = ROOT / "bench" / ".venv-pgqueuer"
            if peer_venv.exists():
                (path / "bench" / ".venv-pgqueuer").symlink_to(peer_venv)
        yield made
    finally:
        for path in made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(path)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def run_once(tree: Path, scenarios: str, extra: Sequence[str]) -> list[dict[str, Any]]:
    """One `bench.run --runs 1` in `tree`: its asyncactions, this checkout's harness."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-m", "bench.run", "--scenarios", scenarios,
                          "--runs", "1", *extra], cwd=tree, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"bench.run in {tree.name} exited {out.returncode}: {tail}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def figures(lines: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """(scenario + settings that tell runs apart, system, figure) -> value."""
    out = {}
    for line in lines:
        if line.get("error") or not line.get("median"):
            continue
        settings = line.get("settings", {})
        scenario = line["scenario"]
        if "worker_processes" in settings and scenario.startswith("s1"):
            scenario += f" W={settings['worker_processes']}"
        for key, value in line["median"].items():
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and key not in NOT_COMPARED:
                out[(scenario, line["system"], key)] = float(value)
    return out


def compare(a: str, b: str, scenarios: str, rounds: int, extra: Sequence[str],
            ) -> list[dict[str, Any]]:
    commits = [_git("rev-parse", "--verify", f"{ref}^{{commit}}") for ref in (a, b)]
    seen: dict[tuple[str, str, str], list[list[float]]] = {}
    with worktrees(commits) as trees:
        for r in range(rounds):
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for side in order:
                log(f"[compare] round {r + 1}/{rounds}: {'AB'[side]} "
                    f"({commits[side][:10]})")
                for key, value in figures(run_once(trees[side], scenarios, extra)).items():
                    seen.setdefault(key, [[], []])[side].append(value)
    rows = []
    for (scenario, system, figure), (va, vb) in sorted(seen.items()):
        # A figure only one side has (a variant the other commit lacks) is shown alone.
        ma = statistics.median(va) if va else None
        mb = statistics.median(vb) if vb else None
        rows.append({"scenario": scenario, "system": system, "figure": figure,
                     "a": ma, "b": mb,
                     "b_over_a": mb / ma if ma and mb is not None else None,
                     "a_runs": va, "b_runs": vb, "a_commit": commits[0],
                     "b_commit": commits[1]})
    return rows


def print_table(rows: list[dict[str, Any]], a: str, b: str) -> None:
    print(f"A = {a} ({rows[0]['a_commit'][:10] if rows else '?'}), "
          f"B = {b} ({rows[0]['b_commit'][:10] if rows else '?'}); medians of the rounds")
    width = max((len(f"{r['scenario']} {r['system']} {r['figure']}") for r in rows),
                default=20)
    print(f"{'figure':<{width}}  {'A':>12}  {'B':>12}  {'B/A':>6}")
    for r in rows:
        name = f"{r['scenario']} {r['system']} {r['figure']}"
        ratio = "-" if r["b_over_a"] is None else f"{r['b_over_a']:.3f}"
        a, b = ("-" if v is None else f"{v:.4g}" for v in (r["a"], r["b"]))
        print(f"{name:<{width}}  {a:>12}  {b:>12}  {ratio:>6}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="the base commit (any git revision)")
    p.add_argument("b", help="the commit to compare with it")
    p.add_argument("--scenarios", default="s2kept,s1",
                   help="bench.run scenarios (default s2kept,s1)")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds (default 3)")
    p.add_argument("--json", type=Path, help="also write one JSON line per figure here")
    args = p.parse_args(argv)
    rows = compare(args.a, args.b, args.scenarios, args.rounds, extra)
    print_table(rows, args.a, args.b)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
