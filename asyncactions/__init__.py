"""asyncactions: a durable work queue in your own database (the transactional outbox)."""

from typing import TYPE_CHECKING, Any

from .action import Action, Status, format_id
from .admin import cancel, get_action, pause, resume, retry, wait_for
from .enqueue import enqueue_all, init_action, init_actions
from .errors import (
    ActionNotFound,
    AsyncActionsError,
    ConfigError,
    DatabaseError,
    ImportFailed,
    InvalidData,
    UnknownProcessor,
    UnserializableData,
)
from .events import publish
from .hooks import report_exceptions
from .live import current_attempt
from .processors import Defer, PermanentFailure, processor

if TYPE_CHECKING:
    from .worker import Worker


def __getattr__(name: str) -> Any:
    """Load the worker machinery (Alembic, APScheduler) only when asked for it, so
    producers and quick CLI commands start faster."""
    if name == "Worker":
        from .worker import Worker

        return Worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Action",
    "ActionNotFound",
    "AsyncActionsError",
    "ConfigError",
    "DatabaseError",
    "Defer",
    "ImportFailed",
    "InvalidData",
    "PermanentFailure",
    "Status",
    "UnknownProcessor",
    "UnserializableData",
    "Worker",
    "cancel",
    "current_attempt",
    "enqueue_all",
    "format_id",
    "get_action",
    "init_action",
    "init_actions",
    "pause",
    "processor",
    "publish",
    "report_exceptions",
    "resume",
    "retry",
    "wait_for",
]
