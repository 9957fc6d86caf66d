"""Run the chaos scenarios: one JSON line per scenario on stdout, progress on stderr.

    python -m bench.chaos                  # the long form of every scenario
    python -m bench.chaos --short          # the form CI runs (tests/test_chaos.py)
    python -m bench.chaos --scenarios repeated_kills,leader_failover

Exits 1 if any scenario's checks failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from .scenarios import SCENARIOS, run_scenario


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the short form (CI)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    args = parser.parse_args()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    failed = 0
    for name in names:
        figures = run_scenario(name, args.short)
        print(json.dumps(figures, default=str), flush=True)
        failed += not figures["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
