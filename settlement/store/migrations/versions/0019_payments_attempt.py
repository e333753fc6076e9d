"""The x402 settle that got each payment accepted: a payee's resend buys only what its own first send did.

A payee sends a settle again, marked `resend`, when the first send's answer was lost, and the facilitator answers a
payment accepted before as accepted. A voucher replayed to a payee (two requests settled one after the other, or two
of its processes) was settled twice: the second settle refused as a replay, and when that answer was lost its resend
was answered accepted, a second response for one voucher. Each settle now names its `attempt`, kept with the payment
it got accepted: a resend of another attempt is the replay it was, whichever `serve` process it reaches, and after a
restart.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("payments", sa.Column("attempt", sa.String(64), nullable=True))


def downgrade() -> None:
    # In place on both (SQLite 3.35 and later drop an unindexed column): a copy of the table, alembic's batch way,
    # would rebuild its indexes, and the payments are the store's largest table.
    op.execute("ALTER TABLE payments DROP COLUMN attempt")
