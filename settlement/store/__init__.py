"""Durable storage: SQLite (embedded default) or PostgreSQL, through SQLAlchemy Core and alembic migrations."""

from settlement.store.database import Database

__all__ = ["Database"]
