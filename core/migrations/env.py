"""Alembic environment of the verticals database: targets `Base.metadata` (core tables plus imported app tables).

Run through `core.db.upgrade_database` (which passes an open connection in ``config.attributes``) or any
Alembic command given `core.db.make_alembic_config(url)`; no ``alembic.ini`` is involved.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection

import core.orm  # noqa: F401 - registers the core tables on Base.metadata
from core.db import Base, UTCDateTime, make_engine

# Upgrades run the explicit scripts in versions/ and need no metadata. Autogenerate compares against
# whatever tables are registered on Base.metadata: the caller imports the app ORM modules first (the core
# never imports the apps), as the recipe in core/db.py shows.
config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    # Autogenerate would render the suite's own column types without importing their module.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        autogen_context.imports.add("import core.db")
        return "core.db.UTCDateTime()"
    return False


def _url() -> str:
    return config.attributes.get("url") or config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    """Emit the migration SQL for the configured URL without connecting (``alembic upgrade --sql``)."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on_connection(connection: Connection) -> None:
    # SQLite cannot ALTER most things in place: batch mode recreates the table ("move and copy").
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the connection handed over by the caller, or on a new engine for the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on_connection(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as new_connection:
            _run_on_connection(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
