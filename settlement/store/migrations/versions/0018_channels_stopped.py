"""A channel its payee stopped at the service, to close it on chain with the latest voucher the service holds.

`closeByPayee` closes a channel at once with the voucher the payee sends. The service learns of the close only once
the indexer confirms it, so every voucher it accepted between the payee's read of the latest one and that moment was
acknowledged (a payee app served what it bought) and can never be settled: a payer who asks for a cooperative
refund, then pays on, was served for nothing. The payee now stops the channel at the service first
(`POST /v1/channels/{channelId}/stop`): this column is set, the row's version raised, and the ingest writer judges
every later voucher against the stopped row, so the latest voucher the stop answers is the last one accepted.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("channels", sa.Column("stopped_at_us", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    lite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("channels", recreate="always" if lite else "auto") as batch:
        batch.drop_column("stopped_at_us")
