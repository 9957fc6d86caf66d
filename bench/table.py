"""Turn bench.run's JSON lines into the Markdown table of bench/README.md (medians).

    python -m bench.run --peers > results.jsonl && python -m bench.table results.jsonl
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

Line = dict[str, Any]


def _drain(m: dict[str, Any]) -> str:
    """The drain rate, and the machine's CPU per action where the run measured it."""
    cpu = m.get("machine_cpu_us_per_action")
    return f"{m['drain_per_s']:,.0f}" + (f" ({cpu:.0f} µs CPU each)" if cpu else "")


# (row label, how to find the line, how to show its median)
ROWS: list[tuple[str, Callable[[Line], bool], Callable[[dict[str, Any]], str]]] = [
    ("S1 bulk enqueue, actions/s", lambda d: d["scenario"] == "s1_enqueue",
     lambda m: f"{m['enqueue_per_s']:,.0f}"),
    ("S1 drain, 1 worker process, actions/s",
     lambda d: d["scenario"] == "s1_drain" and d["settings"]["worker_processes"] == 1,
     _drain),
    ("S1 drain, 2 worker processes, actions/s",
     lambda d: d["scenario"] == "s1_drain" and d["settings"]["worker_processes"] == 2,
     _drain),
    ("S2 outbox, tx/s with ÷ without enqueue", lambda d: d["scenario"] == "s2_outbox",
     lambda m: f"{m['ratio']:.2f} ({m['tx_per_s_with']:,.0f} / {m['tx_per_s_without']:,.0f})"),
    ("S3 pickup p50 / p95 / p99, ms", lambda d: d["scenario"] == "s3_pickup",
     lambda m: f"{m['p50_ms']:.1f} / {m['p95_ms']:.1f} / {m['p99_ms']:.1f}"),
    ("scale: claim latency, with finished rows ÷ empty table",
     lambda d: d["scenario"] == "scale_claim",
     lambda m: f"{m['ratio']:.2f} ({m['claim_ms_full']:.2f} / {m['claim_ms_empty']:.2f} ms)"),
    ("scale: one worker's peak RSS over a long drain, MB", lambda d: d["scenario"] == "scale_rss",
     lambda m: f"{m['peak_rss_mb']:.0f} (n = {m['n']:,})"),
    ("sleep: one worker drains N actions awaiting asyncio.sleep(1), s / peak RSS MB",
     lambda d: d["scenario"] == "sleep_async",
     lambda m: f"{m['drain_s']:.2f} (ideal {m['ideal_s']:.0f}) / {m['peak_rss_mb']:.0f} "
               f"(n = {m['n']:,}, {m['worker_threads']} threads)"),
]


def table(lines: Iterable[Line]) -> str:
    lines = list(lines)
    systems = list(dict.fromkeys(d["system"] for d in lines))
    out = ["| | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for label, matches, show in ROWS:
        cells = []
        for system in systems:
            found = [d for d in lines if d["system"] == system and matches(d)]
            if not found:
                cells.append("n/a")
            elif found[0].get("error") or not found[0].get("median"):
                cells.append("error")
            else:
                cells.append(show(found[0]["median"]))
        if any(c != "n/a" for c in cells):
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    source = open(argv[0]) if argv else sys.stdin  # noqa: SIM115
    with source:
        print(table(json.loads(line) for line in source if line.strip()))


if __name__ == "__main__":
    main(sys.argv[1:])
