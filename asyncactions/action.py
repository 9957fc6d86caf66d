"""The immutable record a processor receives and the API returns."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

from . import codec


class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:  # FINAL_STATUSES, by identity (read for every outcome)
        return self is Status.COMPLETED or self is Status.FAILED or self is Status.CANCELED


FINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELED})


def format_id(action_id: int) -> str:
    """Human form of an id, as shown by the CLI: ASYNC-00000042."""
    return f"ASYNC-{action_id:08d}"


class Action(NamedTuple):
    """One row of `async_action`; attributes mirror the columns (SPEC §2).

    A named tuple, not a frozen dataclass: as immutable, and built ten times faster,
    which counts when a bulk enqueue returns twenty thousand of them.
    """

    id: int
    processor: str
    status: Status
    data: Any
    related_id: str | None
    priority: int
    retries: int | None  # None: the processor's, until a worker first claims it
    attempts: int
    error: str | None
    errors: list[dict[str, Any]]
    result: Any
    unique_key: str | None
    next_eligible_at: datetime
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    claimed_by: str | None
    lease_expires_at: datetime | None
    ordering_key: str | None = None  # actions sharing it run one at a time, in id order
    # What the running (or last) attempt reported: {"fraction", "message", "at"}.
    progress: dict[str, Any] | None = None
    trace_context: str | None = None  # W3C traceparent of the span that enqueued it
    event: str | None = None  # the event whose rule created it

    @property
    def display_id(self) -> str:
        return format_id(self.id)

    def __str__(self) -> str:
        return f"{self.display_id} {self.processor} {self.status}"


def row_to_action(row: Sequence[Any], *, payloads: bool = True) -> Action:
    """A row selected with schema.action_columns() as an Action (payloads decoded, unless
    `payloads` is false: then data and result stay raw JSON text, for rows that do not
    decode)."""
    if not payloads:
        (id_, processor, status, data, related_id, priority, retries, attempts, error,
         errors, result, unique_key, *times, ordering_key, progress, trace_context,
         event) = row[:22]
        try:
            errors = codec.loads(errors)
        except codec.MALFORMED:
            errors = None
        return Action(id_, processor, Status(status), data, related_id, priority, retries,
                      attempts, error, errors if isinstance(errors, list) else [], result,
                      unique_key, *times, ordering_key, _decoded(progress), trace_context,
                      event)
    # Every claimed row comes through here: built in place from the row's values (a
    # named tuple's own constructor, and unpacking 22 values, cost more than the rest),
    # absent payloads skipping the decoder's call.
    values = list(row[:22])
    status, data, errors, result, progress = (values[2], values[3], values[9], values[10],
                                              values[19])
    if errors is not None:
        errors = codec.loads(errors)
        if not isinstance(errors, list):
            raise ValueError(f"errors is {type(errors).__name__}, not a list")
    values[2] = _STATUSES.get(status) or Status(status)
    if data is not None:
        values[3] = codec.loads(data)
    values[9] = errors or []
    if result is not None:
        values[10] = codec.loads(result)
    if progress is not None:
        values[19] = _decoded(progress)
    return tuple.__new__(Action, values)


_STATUSES = {status.value: status for status in Status}


def read_action(row: Any) -> Action:
    """A row selected with action_columns(), decoded. In a row that does not decode
    (written by hand or by an older version) each payload that does not (data, result,
    an error history that is not a list of entries) stays as stored, text, so an
    operator can see what is wrong, and cancel or retry the action."""
    try:
        action = row_to_action(row)
        if _is_history(action.errors):
            return action
    except codec.MALFORMED:
        pass
    raw = Action._make(row[:len(Action._fields)])
    errors = [] if raw.errors is None else _decoded(raw.errors)
    return raw._replace(status=Status(raw.status), data=_decoded(raw.data),
                        result=_decoded(raw.result), progress=_decoded(raw.progress),
                        errors=errors if _is_history(errors) else raw.errors)


def _decoded(text: str | None) -> Any:
    try:
        return codec.loads(text)
    except codec.MALFORMED:
        return text


def _is_history(errors: Any) -> bool:
    return isinstance(errors, list) and all(isinstance(e, dict) for e in errors)
