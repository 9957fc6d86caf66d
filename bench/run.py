"""The benchmark of issue 4: S1 (bulk enqueue, drain), S2 (outbox cost), S3 (pickup
latency) and the scale check, against asyncactions and, with --peers, pgqueuer.

    python -m bench.run [--scenarios s1,s2,s3,scale] [--runs 3] [--workers 1,2] [--peers]

One JSON line per scenario result on stdout (the median and every run, the settings, the
server's durability settings, the machine); progress on stderr. Every run gets a fresh
database, dropped afterwards; the server's settings are never changed.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import pg, scale, scenarios
from bench.peers.pgqueuer_system import PgQueuer
from bench.procs import log, wait_for_quiet
from bench.systems import AsyncActions, AsyncActionsAio, System

SCENARIOS = ("s1", "s2", "s2kept", "s3", "scale", "sleep")
Figures = dict[str, Any]


class Bench:
    def __init__(self, args: argparse.Namespace, systems: Sequence[System]) -> None:
        self.args = args
        self.systems = systems
        self.unavailable: dict[str, str] = {}
        self.context = {"postgres": pg.server_settings(args.database_url),
                        "machine": pg.machine()}

    def prepare(self) -> None:
        for system in self.systems:
            try:
                system.prepare()
            except Exception as exc:
                self.unavailable[system.name] = _describe(exc)
                log(f"{system.name} is unavailable: {self.unavailable[system.name]}")

    def repeat(self, label: str, runs: int, measure: Callable[[System], Figures],
               headline: Sequence[str], systems: Sequence[System] | None = None,
               ) -> dict[str, tuple[list[Figures], str | None]]:
        """`runs` runs of `measure` per system, the systems alternating within each round
        so that drift on the machine hits them alike; a failing system is reported as such
        and skipped from then on."""
        systems = systems or self.systems
        results: dict[str, list[Figures]] = {s.name: [] for s in systems}
        errors: dict[str, str] = {s.name: self.unavailable[s.name] for s in systems
                                  if s.name in self.unavailable}
        for run in range(runs):
            for system in systems:
                if system.name in errors:
                    continue
                busy = wait_for_quiet(self.args.quiet_cpu, self.args.quiet_timeout)
                if busy > self.args.quiet_cpu:
                    log(f"[{label}] the machine is still {busy:.0f}% busy with other work; "
                        "measuring anyway")
                try:
                    figures = {**measure(system), "machine_busy_pct_before": busy}
                except Exception as exc:
                    errors[system.name] = _describe(exc)
                    log(f"[{label}] {system.name} run {run + 1}/{runs} failed: "
                        f"{errors[system.name]}")
                    continue
                results[system.name].append(figures)
                shown = ", ".join(f"{k} {_fmt(figures[k])}" for k in headline)
                log(f"[{label}] {system.name} run {run + 1}/{runs}: {shown}")
        return {name: (runs_, errors.get(name)) for name, runs_ in results.items()}

    def emit(self, scenario: str, system: System, runs: list[Figures], error: str | None,
             settings: dict[str, Any]) -> None:
        line: dict[str, Any] = {"scenario": scenario, "system": system.name}
        if error:
            line["error"] = error
        line["median"] = median(runs) if runs else None
        line["runs"] = runs
        line["settings"] = {**settings, **system.describe()}
        line.update(self.context)
        print(json.dumps(_rounded(line)), flush=True)

    # --- scenarios -----------------------------------------------------------------

    def s1(self) -> None:
        a = self.args
        enqueues: dict[str, list[Figures]] = {s.name: [] for s in self.systems}
        enqueue_errors: dict[str, str | None] = {s.name: None for s in self.systems}
        for workers in a.workers:
            results = self.repeat(f"s1 W={workers}", a.runs,
                                  lambda s, w=workers: scenarios.s1(s, a.database_url, a.n, w,
                                                                    a.analyze),
                                  ("enqueue_per_s", "drain_per_s"))
            for system in self.systems:
                runs, error = results[system.name]
                enqueues[system.name] += [{k: r[k] for k in ("enqueue_s", "enqueue_per_s")}
                                          for r in runs]
                enqueue_errors[system.name] = enqueue_errors[system.name] or error
                drains = [{k: v for k, v in r.items() if not k.startswith("enqueue")}
                          for r in runs]
                self.emit("s1_drain", system, drains, error,
                          {"n": a.n, "worker_processes": workers,
                           "analyzed_before_drain": a.analyze,
                           "drain_poll_s": scenarios.DRAIN_POLL})
        for system in self.systems:
            self.emit("s1_enqueue", system, enqueues[system.name], enqueue_errors[system.name],
                      {"n": a.n, "payload": '{"i": i}'})

    def s2(self) -> None:
        a = self.args
        results = self.repeat("s2", a.runs, lambda s: scenarios.s2(
            s, a.database_url, a.s2_blocks, a.s2_per_block), ("ratio",))
        for system in self.systems:
            self.emit("s2_outbox", system, *results[system.name],
                      {"blocks": a.s2_blocks, "tx_per_block": a.s2_per_block,
                       "tx_each_way": a.s2_blocks * a.s2_per_block,
                       "tx": "INSERT INTO orders … RETURNING id (+ one enqueue), commit"})

    def s2kept(self) -> None:
        """S2 on one kept connection (issue 17): asyncactions' SQLAlchemy Connection with
        raw psycopg sending the same statement beside it (bench/kept.py); pgqueuer's S2
        is already on one kept asyncpg connection."""
        a = self.args
        systems = [s for s in self.systems if not isinstance(s, AsyncActionsAio)]
        results = self.repeat("s2kept", a.runs, lambda s: scenarios.s2(
            s, a.database_url, a.s2_blocks, a.s2_per_block, kept=True), ("ratio",),
            systems=systems)
        for system in systems:
            self.emit("s2_kept", system, *results[system.name],
                      {"blocks": a.s2_blocks, "tx_per_block": a.s2_per_block,
                       "tx_each_way": a.s2_blocks * a.s2_per_block,
                       "tx": "INSERT INTO orders … RETURNING id (+ one enqueue), commit, "
                             "on one connection opened before the timing"})

    def s3(self) -> None:
        a = self.args
        results = self.repeat("s3", a.runs, lambda s: scenarios.s3(
            s, a.database_url, a.s3_count, a.s3_gap_ms / 1000), ("p50_ms", "p99_ms"))
        for system in self.systems:
            self.emit("s3_pickup", system, *results[system.name],
                      {"enqueues": a.s3_count, "gap_ms": a.s3_gap_ms, "worker_processes": 1})

    def scale(self) -> None:
        a = self.args
        ours = [s for s in self.systems if isinstance(s, AsyncActions)]
        claim = self.repeat("scale claim", a.scale_runs, lambda s: scale.claim_latency(
            s, a.database_url, a.scale_rows), ("claim_ms_empty", "claim_ms_full", "ratio"),
            systems=ours)
        for system in ours:
            self.emit("scale_claim", system, *claim[system.name],
                      {"finished_rows": a.scale_rows, "pending_rows": scale.PENDING,
                       "claim_batch": scale.CLAIM_BATCH,
                       "claims_measured": scale.ROUNDS * scale.CLAIMS_PER_ROUND})
        rss = self.repeat("scale rss", a.scale_runs, lambda s: scale.worker_rss(
            s, a.database_url, a.rss_n), ("peak_rss_mb", "drain_per_s"), systems=ours)
        for system in ours:
            self.emit("scale_rss", system, *rss[system.name],
                      {"n": a.rss_n, "worker_processes": 1, "analyzed_before_drain": True})

    def sleep(self) -> None:
        a = self.args
        system = AsyncActionsAio(a.sleep_concurrency)
        results = self.repeat("sleep", a.runs, lambda s: scale.sleepers(
            system, a.database_url, a.sleep_n, a.sleep_concurrency),
            ("drain_s", "peak_rss_mb"), systems=[system])
        self.emit("sleep_async", system, *results[system.name],
                  {"n": a.sleep_n, "processor": "async def: await asyncio.sleep(1)",
                   "worker_processes": 1})


def median(runs: list[Figures]) -> Figures:
    """Per figure: the median of the runs (numbers), else the common value."""
    out: Figures = {}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers and len(numbers) == len(values):
            out[key] = statistics.median(numbers)
        else:
            out[key] = values[0] if all(v == values[0] for v in values) else values
    return out


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    return f"{value:,.3g}" if isinstance(value, float) and abs(value) < 100 else \
        f"{value:,.0f}" if isinstance(value, float) else str(value)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda value: [kind(x.strip()) for x in value.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", type=_csv(str), default=list(SCENARIOS),
                   help="comma-separated, from s1,s2,s2kept,s3,scale,sleep (default: all)")
    p.add_argument("--runs", type=int, default=3, help="runs per scenario; the median is "
                   "reported (default 3)")
    p.add_argument("--workers", type=_csv(int), default=[1, 2],
                   help="S1 worker processes, comma-separated (default 1,2)")
    p.add_argument("--n", type=int, default=20_000, help="S1 actions (default 20000)")
    p.add_argument("--concurrency", type=int, default=10,
                   help="asyncactions worker --concurrency (default 10, the product default)")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="admin URL; each run creates and drops its own database there")
    p.add_argument("--aio", action="store_true",
                   help="also run S1-S3 from asyncio: asyncactions.aio on an AsyncEngine / "
                   "AsyncSession, async def processors (system asyncactions-aio)")
    p.add_argument("--sleep-n", type=int, default=2000,
                   help="sleep: actions that await asyncio.sleep(1) (default 2000)")
    p.add_argument("--sleep-concurrency", type=int, default=500,
                   help="sleep: the worker's --concurrency (default 500)")
    p.add_argument("--peers", action="store_true",
                   help="also run pgqueuer (installed into bench/.venv-pgqueuer)")
    p.add_argument("--analyze", action="store_true",
                   help="S1: ANALYZE the queue table between enqueue and drain (a diagnostic: "
                   "what the drain does once the planner has statistics)")
    p.add_argument("--quiet-cpu", type=float, default=20.0,
                   help="before each run, wait for a second with the CPUs at most this %% "
                   "busy (default 20; 100 disables)")
    p.add_argument("--quiet-timeout", type=float, default=120.0,
                   help="measure anyway after waiting this many seconds (default 120)")
    p.add_argument("--pgq-managers", type=_csv(int), default=[1],
                   help="pgqueuer QueueManagers per worker process, comma-separated: 1 is "
                   "`pgq run`, 5 what pgqueuer's own benchmark runs (default 1)")
    p.add_argument("--pgq-tuned", action="store_true",
                   help="with --peers, also run pgqueuer-tuned: batch_size 50, "
                   "max_concurrent_tasks 100, uvloop (issue 17); --pgq-managers= with "
                   "nothing after it runs the tuned variant alone")
    p.add_argument("--s2-blocks", type=int, default=10)
    p.add_argument("--s2-per-block", type=int, default=300)
    p.add_argument("--s2kept-proxy-ms", type=float, default=None, dest="s2kept_delay_ms",
                   help="s2kept: connect through a TCP proxy (bench/latency_proxy.py) that "
                   "holds every chunk this long each way, as for a server on another host; "
                   "0 is the proxy alone (a round trip of about 0.15 ms here)")
    p.add_argument("--s3-count", type=int, default=200)
    p.add_argument("--s3-gap-ms", type=float, default=20.0)
    p.add_argument("--scale-rows", type=int, default=2_000_000,
                   help="finished rows for the claim check (default 2,000,000)")
    p.add_argument("--rss-n", type=int, default=200_000,
                   help="actions the RSS check drains (default 200,000)")
    p.add_argument("--scale-runs", type=int, default=1,
                   help="runs of the (slow) scale check (default 1)")
    args = p.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from "
                f"{','.join(SCENARIOS)}")
    return args


def _terminated(*_: Any) -> None:
    log("stopped by SIGTERM; cleaning up")
    sys.exit(143)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: workers are stopped and databases dropped on the way out.
    signal.signal(signal.SIGTERM, _terminated)
    systems: list[System] = [AsyncActions(args.concurrency, args.s2kept_delay_ms)]
    if args.aio:
        systems.append(AsyncActionsAio(args.concurrency))
    if args.peers:
        systems += [PgQueuer(managers) for managers in args.pgq_managers]
        if args.pgq_tuned:
            systems.append(PgQueuer(tuned=True))
    bench = Bench(args, systems)
    log(f"PostgreSQL {bench.context['postgres']}")
    bench.prepare()
    for name in SCENARIOS:
        if name in args.scenarios:
            getattr(bench, name)()


if __name__ == "__main__":
    main()
