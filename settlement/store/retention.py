"""Retention: payment rows whose value is settled on chain are kept for audit for a configured time, then removed
(docs/api.md#retention). What stays for good: each channel's latest payment (the voucher the engine settles and a
re-send is compared with), every payment not yet settled, and the channel rows with their totals."""

from __future__ import annotations

from sqlalchemy import Connection, and_, delete, select

from settlement.store.channels import latest_accepted
from settlement.store.database import Database
from settlement.store.tables import channels, payments

BATCH = 10_000  # rows a transaction removes at most


def compact_payments(conn: Connection, accepted_before_us: int, limit: int = BATCH) -> int:
    """Remove up to `limit` payments accepted before `accepted_before_us` whose cumulative amount the chain has
    settled and that are not their channel's latest; returns how many."""
    doomed = (
        select(payments.c.id)
        .join(channels, channels.c.channel_no == payments.c.channel_no)
        .where(
            and_(
                payments.c.accepted_at_us < accepted_before_us,
                payments.c.cumulative <= channels.c.settled,
                payments.c.cumulative < latest_accepted(conn),
            )
        )
        .limit(limit)
    )
    ids = [int(i) for i in conn.execute(doomed).scalars()]
    if ids:
        conn.execute(delete(payments).where(payments.c.id.in_(ids)))
    return len(ids)


def compact(db: Database, retention_days: float, now_us: int) -> int:
    """Everything `compact_payments` may remove for this retention, in write transactions of bounded size (ingest
    goes on between them); returns how many rows went."""
    before = now_us - int(retention_days * 86_400 * 1_000_000)
    removed = 0
    while True:
        with db.write() as conn:
            done = compact_payments(conn, before, BATCH)
        removed += done
        if done < BATCH:
            return removed
