"""asyncactions: a durable work queue in your own database (the transactional outbox)."""

from .action import Action, Status, format_id
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
from .processors import Defer, PermanentFailure, processor

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
    "format_id",
    "init_action",
    "init_actions",
    "processor",
]
