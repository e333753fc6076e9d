"""Alembic environment: runs on the connection `Database.migrate` hands over (config.attributes["connection"])."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from settlement.store.tables import metadata

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # plain `alembic` command line: connect to the configured URL
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite:///.settlement/settlement.db")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
