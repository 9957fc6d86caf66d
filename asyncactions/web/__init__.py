"""The dashboard and HTTP API (SPEC §7): `create_app(...)` returns one ASGI app.

Needs the `web` extra: pip install 'asyncactions[web]'.
"""

from .app import create_app

__all__ = ["create_app"]
