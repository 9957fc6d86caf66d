"""The dashboard and HTTP API (SPEC §7): `create_app(...)` returns one ASGI app.

Needs the `web` extra: pip install 'asyncactions[web]'. Starlette is imported only when
`create_app` is asked for, so `asyncactions web` can check its host (web.access) and
name the missing extra in one line.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["create_app"]
