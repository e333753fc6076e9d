"""Channel facts are current to a chain position (block, log index), not to a block.

Several events of one channel can share a block; with the block alone as the position, every event after the first
in that block was taken for already applied. Rows written before this revision were current to the end of their
block (that is how the old code treated them), so they get END_OF_BLOCK.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

END_OF_BLOCK = 2**31 - 1  # settlement.model.END_OF_BLOCK, frozen here as migrations must be


def upgrade() -> None:
    with op.batch_alter_table("channels") as batch:
        batch.add_column(sa.Column("as_of_log", sa.Integer(), nullable=False, server_default=str(END_OF_BLOCK)))


def downgrade() -> None:
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("as_of_log")
