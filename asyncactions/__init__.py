"""asyncactions: a durable work queue in your own database (the transactional outbox)."""

from .action import Action, Status, format_id
from .admin import cancel, get_action, retry, wait_for
from .enqueue import init_action, init_actions
from .errors import (
    ActionNotFound,
    AsyncActionsError,
    ConfigError,
    DatabaseError,
    ImportFailed,
    UnknownProcessor,
    UnserializableData,
)
from .hooks import report_exceptions
from .processors import Defer, PermanentFailure, processor
from .worker import Worker

__all__ = [
    "Action",
    "ActionNotFound",
    "AsyncActionsError",
    "ConfigError",
    "DatabaseError",
    "Defer",
    "ImportFailed",
    "PermanentFailure",
    "Status",
    "UnknownProcessor",
    "UnserializableData",
    "Worker",
    "cancel",
    "format_id",
    "get_action",
    "init_action",
    "init_actions",
    "processor",
    "report_exceptions",
    "retry",
    "wait_for",
]
