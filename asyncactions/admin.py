"""Operator actions on single actions: look up, cancel, run again, wait for the end."""

from __future__ import annotations

import re
import time
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy import exc as sa_exc

from . import codec
from .action import FINAL_STATUSES, Action, Status
from .enqueue import Database, connection, row_to_action
from .errors import ActionNotFound, AsyncActionsError
from .schema import ACTIVE_STATUSES, NOW, action_columns, async_action

t = async_action
_ID = re.compile(r"^(?:ASYNC-)?0*(\d+)$", re.IGNORECASE)
_FINAL = tuple(s.value for s in FINAL_STATUSES)


def parse_id(value: str | int) -> int:
    """42, '42' or 'ASYNC-00000042' -> 42."""
    if isinstance(value, int):
        return value
    match = _ID.match(value.strip())
    if match is None:
        raise ActionNotFound(f"{value!r} is not an action id; write it as 42 or ASYNC-00000042")
    return int(match[1])


def get_action(db: Database, action_id: int | str) -> Action:
    action_id = parse_id(action_id)
    with connection(db) as conn:
        row = conn.execute(select(*action_columns()).where(t.c.id == action_id)).first()
    if row is None:
        raise ActionNotFound(f"no action {action_id} (ASYNC-{action_id:08d}); "
                             "`asyncactions list` shows the ones that exist")
    try:
        return row_to_action(row)
    except codec.MALFORMED:  # shown as stored, so an operator can see what is wrong
        return row_to_action(row, payloads=False)


CANCEL = (
    update(t)
    .where(t.c.id == bindparam("b_id"), t.c.status.in_(ACTIVE_STATUSES))
    .values(status=Status.CANCELED.value, finished_at=NOW, claimed_by=None,
            lease_expires_at=None)
    .returning(*action_columns())
)


def cancel(db: Database, action_id: int | str) -> Action:
    """Cancel a pending or running action. A running attempt goes on, but its outcome
    is fenced out: the action stays canceled."""
    return _transition(db, parse_id(action_id), CANCEL, {}, "cancel",
                       "only pending or running actions can be canceled")


RETRY = (
    update(t)
    .where(t.c.id == bindparam("b_id"), t.c.status.in_(_FINAL))
    .values(status=Status.PENDING.value, next_eligible_at=NOW, finished_at=None,
            retries=bindparam("retries"))
    .returning(*action_columns())
)


def retry(db: Database, action_id: int | str, *, retries: int | None = None) -> Action:
    """Run a finished action again now; attempts and error history are kept."""
    action_id = parse_id(action_id)
    if retries is not None and retries < 0:
        raise AsyncActionsError(f"retries must be >= 0, got {retries}")
    params = {"retries": retries} if retries is not None else {}
    stmt = RETRY if retries is not None else RETRY.values(retries=t.c.retries)
    try:
        return _transition(db, action_id, stmt, params, "retry",
                           "only completed, failed or canceled actions can be run again")
    except sa_exc.IntegrityError:
        raise AsyncActionsError(f"cannot retry action {action_id}: another pending or running "
                                "action holds its unique_key; cancel that one first") from None


def _transition(db: Database, action_id: int, stmt: Any, params: dict[str, Any], verb: str,
                rule: str) -> Action:
    with connection(db) as conn:
        row = conn.execute(stmt, {"b_id": action_id, **params}).first()
    if row is not None:
        return row_to_action(row)
    current = get_action(db, action_id)  # raises ActionNotFound
    raise AsyncActionsError(f"cannot {verb} {current.display_id}: it is {current.status}; "
                            f"{rule}")


def wait_for(db: Database, action_id: int | str, timeout: float = 60) -> Action:
    """Block until the action is completed, failed or canceled; TimeoutError after
    `timeout` seconds. Each look runs in its own short transaction when given an Engine."""
    action_id = parse_id(action_id)
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        action = get_action(db, action_id)
        if action.status.is_final:
            return action
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{action.display_id} is still {action.status} after "
                               f"{timeout:g}s")
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.25)

