"""Alembic, driven from Python: the migrations ship inside the wheel.

Our history lives in its own version table so it sits beside the application's.
"""

from __future__ import annotations

import io
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from .database import translated_errors

VERSION_TABLE = "asyncactions_alembic_version"


def migrations_dir() -> Path:
    packaged = Path(__file__).parent / "migrations"  # inside an installed wheel
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "migrations"


def _config(**attributes: object) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes.update(attributes)
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    with translated_errors(engine), engine.begin() as conn:
        command.upgrade(_config(connection=conn), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with translated_errors(engine), engine.begin() as conn:
        command.downgrade(_config(connection=conn), revision)


def current(engine: Engine) -> str | None:
    with translated_errors(engine), engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def is_current(engine: Engine) -> bool:
    return current(engine) == head()


def offline_sql(dialect: str) -> str:
    """The DDL of every migration, for a DBA to review or apply by hand."""
    buffer = io.StringIO()
    cfg = _config(dialect=dialect)
    cfg.output_buffer = buffer
    command.upgrade(cfg, "head", sql=True)
    return buffer.getvalue()
