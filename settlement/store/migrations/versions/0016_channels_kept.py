"""PostgreSQL: a payment's channel is guaranteed by the channels never going away, not by a per-row foreign key check.

The foreign key from payments to channels made PostgreSQL run a look-up with a row lock on the channel (an internal
`SELECT ... FOR KEY SHARE`) for every payment inserted: 10-30% of the store writer's throughput (issue 20). What it
guarded is kept by other means:
- a payment is inserted only by the group statement of `settlement.store.channels`, which inserts only rows joined
  to the channel rows the same statement updated, and fails the group if any payment was left out;
- a channel row is never deleted, truncated or renumbered: triggers refuse it (SQLSTATE 23001, restrict_violation,
  what the foreign key's own refusal was), so no payment can lose its channel afterwards.
SQLite keeps the foreign key: its check is a look-up inside the process, and its insert is not joined to the update.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_FK = "fk_payments_channel_no_channels"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_constraint(_FK, "payments", type_="foreignkey")
    op.execute(
        "CREATE FUNCTION channels_are_kept() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " RAISE EXCEPTION 'channels are never deleted or renumbered: their payments are the audit trail'"
        " USING ERRCODE = 'restrict_violation'; END $$"
    )
    op.execute(
        "CREATE TRIGGER channels_kept BEFORE DELETE OR TRUNCATE ON channels"
        " FOR EACH STATEMENT EXECUTE FUNCTION channels_are_kept()"
    )
    op.execute(
        "CREATE TRIGGER channels_keep_numbers BEFORE UPDATE OF channel_no ON channels FOR EACH ROW"
        " WHEN (OLD.channel_no IS DISTINCT FROM NEW.channel_no) EXECUTE FUNCTION channels_are_kept()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER channels_keep_numbers ON channels")
    op.execute("DROP TRIGGER channels_kept ON channels")
    op.execute("DROP FUNCTION channels_are_kept()")
    op.create_foreign_key(_FK, "payments", "channels", ["channel_no"], ["channel_no"])
