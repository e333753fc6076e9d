"""The webhook sender's look for due webhooks reads only live ones, on an index.

`due_webhooks` runs at every tick of the sender (twice a second) and scanned the whole table, the deleted webhooks
included (a payee's deleted webhooks are kept: their history), so a payee that makes and deletes webhooks made every
tick slower for everyone. A partial index on the next attempt of the live ones answers it from the index.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_INDEX = "ix_webhooks_due"


def upgrade() -> None:
    live = sa.text("deleted_at_us IS NULL")
    op.create_index(_INDEX, "webhooks", ["next_attempt_us"], sqlite_where=live, postgresql_where=live)


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="webhooks")
