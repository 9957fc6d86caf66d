"""The built-in processor of background fan-outs (`enqueue_all(..., background=True)`),
served by every worker.

It streams the cross product in batches; each batch is one transaction that also
advances the fan-out action's `done` (fenced like an outcome, so a worker that lost its
claim writes nothing). A worker that dies mid-way loses at most its open batch: the next
attempt skips the `done` combinations already enqueued, so none is enqueued twice and
none is missed. `on_complete` is enqueued in a last transaction that marks the fan-out
completed, so it runs once.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, update

from . import codec
from .action import Action, Status
from .enqueue import (
    FANOUT,
    _batched,
    combinations,
    fanout_iterables,
    init_action,
    init_actions,
)
from .live import current_attempt
from .processors import Processor, ProcessorSettings
from .schema import as_payload, async_action

t = async_action
ADVANCE = (
    update(t)
    .where(t.c.id == bindparam("p_id"), t.c.attempts == bindparam("p_attempts"),
           t.c.claimed_by == bindparam("p_worker"), t.c.status == Status.RUNNING.value)
    .values(data=as_payload(bindparam("p_data")), progress=as_payload(bindparam("p_progress")))
)


class ClaimLost(Exception):
    """This attempt no longer holds the fan-out action: its batch must not land."""


def fan_out(action: Action) -> dict[str, Any]:
    spec = dict(action.data)
    engine = current_attempt().engine
    total, processor = spec["total"], spec["processor"]
    options = dict(spec["options"])
    if options.get("delay") is not None:
        options["delay"] = timedelta(seconds=options["delay"])
    rest = itertools.islice(combinations(fanout_iterables(spec), spec["static"]),
                            spec["done"], None)
    for batch in _batched(rest, spec["batch"]):
        if current_attempt().cancel_requested:
            raise ClaimLost("the fan-out was canceled")
        with engine.begin() as conn:
            init_actions(conn, processor, batch, **options)
            spec["done"] += len(batch)
            _advance(conn, action, spec)
    if not spec["completed"]:
        with engine.begin() as conn:
            if spec["on_complete"]:
                init_action(conn, spec["on_complete"], {"count": total, "processor": processor})
            spec["completed"] = True
            _advance(conn, action, spec)
    return {"count": total, "processor": processor}


def _advance(conn: Connection, action: Action, spec: dict[str, Any]) -> None:
    """Record how far it got, in the batch's transaction; raise if the claim is gone."""
    done, total = spec["done"], spec["total"]
    progress = {"fraction": done / total if total else 1.0,
                "message": f"{done} of {total} enqueued",
                "at": datetime.now(UTC).isoformat(timespec="milliseconds")}
    written = conn.execute(ADVANCE, {"p_id": action.id, "p_attempts": action.attempts,
                                     "p_worker": action.claimed_by,
                                     "p_data": codec.dumps(spec),
                                     "p_progress": codec.dumps(progress)}).rowcount
    if written != 1:
        raise ClaimLost(f"{action.display_id} lost its claim; its batch was rolled back")


# Retried soon, then less often: a fan-out resumes where it stopped.
PROCESSOR = Processor(FANOUT, fan_out, ProcessorSettings(
    retries=10, retry_interval=timedelta(seconds=1), backoff="exponential"))
