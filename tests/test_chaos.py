"""The chaos suite's short form (bench/chaos, issue 15): real worker processes on a
PostgreSQL cluster of the test's own, faults injected while actions flow, and an
execution ledger the processors write, so a second run of an action is seen even
when it completed once. The long form: `python -m bench.chaos`."""

from __future__ import annotations

import pytest

from bench.chaos.scenarios import SHORT, run_scenario


@pytest.mark.parametrize("scenario", SHORT)
def test_under_faults_nothing_is_lost_stuck_or_run_beyond_what_was_in_flight(
        scenario: str) -> None:
    figures = run_scenario(scenario, short=True)
    if "lost" in figures:  # the scenarios that drain a backlog
        assert (figures["lost"], figures["stuck_running"], figures["not_final"],
                figures["never_ran"]) == (0, 0, 0, 0), figures
        assert figures["completed"] == figures["actions"], figures
        assert figures["extra_runs"] <= figures["extra_runs_bound"], figures
    if "workers_survived" in figures:
        assert figures["workers_survived"], figures
    if scenario == "leader_failover":
        assert (figures["duplicates"], figures["gaps"]) == (0, []), figures
    if scenario == "partition":
        assert figures["late_outcomes_fenced"] and figures["runs_new_work_after"], figures
    if scenario == "pool_exhaustion":
        assert figures["workers_that_saw_refusals"] > 0, "the pool was never exhausted"
    assert figures["ok"], figures
