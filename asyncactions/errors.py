"""Errors raised to callers. Each message names what is wrong and how to fix it."""


class AsyncActionsError(Exception):
    """Base of every error asyncactions raises to its callers."""


class ConfigError(AsyncActionsError):
    """The configuration file, environment or an option is invalid."""


class UnserializableData(AsyncActionsError):
    """Data or a result holds a value the codec cannot store."""


class UnknownProcessor(AsyncActionsError):
    """A processor name that no imported module registered."""


class ActionNotFound(AsyncActionsError):
    """No action has the given id."""


class DatabaseError(AsyncActionsError):
    """The database is unreachable or its schema is missing."""

    # About the connection (worth retrying), not the schema; and the server's SQLSTATE
    # when it said "not now" (53300: too many connections).
    connection: bool = False
    sqlstate: str | None = None


class ImportFailed(AsyncActionsError):
    """A module named with --import (or `imports`) could not be imported."""


class InvalidData(AsyncActionsError):
    """Data that does not fit its processor's schema (at enqueue or on the worker)."""


class MissingReference(InvalidData):
    """A referenced row (`{"$ref": …}` in data) that is gone, or a class that does not
    import, on the worker."""
