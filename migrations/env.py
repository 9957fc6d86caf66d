"""Alembic environment for asyncactions' own migrations (driven by asyncactions.migrate)."""

from alembic import context

VERSION_TABLE = "asyncactions_alembic_version"
config = context.config

if context.is_offline_mode():
    context.configure(dialect_name=config.attributes.get("dialect", "postgresql"),
                      literal_binds=True, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()
else:
    context.configure(connection=config.attributes["connection"], version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()
