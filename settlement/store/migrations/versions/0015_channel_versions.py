"""Each channel row carries a version that every write of the row raises; PostgreSQL leaves room for its rewrites.

The ingest writer keeps the channels it wrote in memory and, at its next group, reads only their versions (under
the same row locks as before) instead of whole rows: a channel whose version moved (the indexer saw a top-up or a
close, another process accepted a voucher) is read again; the others are judged against the writer's own copy.

On PostgreSQL the table's pages keep half their space free (fillfactor 50), so that rewriting a channel's row at each
group is a heap-only update that touches none of its indexes. Pages written before this revision keep their layout
until the table is rewritten (`VACUUM FULL channels`).

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("channels", sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE channels SET (fillfactor = 50)")


def downgrade() -> None:
    lite = op.get_bind().dialect.name == "sqlite"
    if not lite:
        op.execute("ALTER TABLE channels RESET (fillfactor)")
    with op.batch_alter_table("channels", recreate="always" if lite else "auto") as batch:
        batch.drop_column("version")
