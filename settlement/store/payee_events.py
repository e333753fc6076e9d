"""What a payee is told, read from what the store already records (no row per voucher is added for it): its
accepted payments (the append-only `payments` log, by id) and the confirmed chain events of its channels (by block
and log index); and its webhooks, each with the position its deliveries stand at."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select, text, update

from settlement.domain.model import ChainPosition, HubEvent
from settlement.store.chainlog import after_position
from settlement.store.standing import Admission, Limits, admit
from settlement.store.tables import chain_events, channels, payments, webhooks

CLOSE_EVENTS = (HubEvent.CLOSE_REQUESTED.value, HubEvent.CHANNEL_CLOSED.value)


@dataclass(frozen=True)
class PaymentRow:
    payment_id: int
    channel_id: str
    payer: str
    token: str
    cumulative: int
    increment: int
    reference: str | None
    idempotency_key: str | None
    accepted_at_us: int


@dataclass(frozen=True)
class ChainRow:
    block_number: int
    log_index: int
    tx_hash: str
    event: str
    channel_id: str | None
    args: dict[str, Any]


def payments_after(conn: Connection, payee: str, after: int, limit: int) -> list[PaymentRow]:
    query = (
        select(
            payments.c.id,
            channels.c.channel_id,
            channels.c.payer,
            channels.c.token,
            payments.c.cumulative,
            payments.c.increment,
            payments.c.reference,
            payments.c.idempotency_key,
            payments.c.accepted_at_us,
        )
        .join(channels, channels.c.channel_no == payments.c.channel_no)
        .where(channels.c.payee == payee, payments.c.id > after)
        .order_by(payments.c.id)
        .limit(limit)
    )
    return [PaymentRow(*row) for row in conn.execute(query)]


def payment_ids_after(conn: Connection, after: int, limit: int) -> list[int]:
    """Every payee's payment ids after `after`, in order (a primary-key range: what the feed's horizon walks)."""
    query = select(payments.c.id).where(payments.c.id > after).order_by(payments.c.id).limit(limit)
    return [int(i) for i in conn.execute(query).scalars()]


def last_payment_id(conn: Connection) -> int:
    return int(conn.execute(select(payments.c.id).order_by(payments.c.id.desc()).limit(1)).scalar() or 0)


def chain_events_after(conn: Connection, payee: str, block: int, log: int, limit: int) -> list[ChainRow]:
    """The payee's channels' close events and every settlement event (one per payee and token: filtered here by its
    `payee` argument), after (block, log), in chain order."""
    own = select(channels.c.channel_id).where(channels.c.payee == payee).scalar_subquery()
    query = (
        select(
            chain_events.c.block_number,
            chain_events.c.log_index,
            chain_events.c.tx_hash,
            chain_events.c.event,
            chain_events.c.channel_id,
            chain_events.c.args,
        )
        .where(
            after_position(block, log),
            or_(
                chain_events.c.event == HubEvent.CHANNELS_SETTLED.value,
                and_(chain_events.c.event.in_(CLOSE_EVENTS), chain_events.c.channel_id.in_(own)),
            ),
        )
        .order_by(chain_events.c.block_number, chain_events.c.log_index)
        .limit(limit)
    )
    return [ChainRow(b, i, tx, event, cid, json.loads(args)) for b, i, tx, event, cid, args in conn.execute(query)]


def payees_paid(conn: Connection, after: int, upto: int) -> set[str]:
    """The payees (lower case) with a payment whose id is in (after, upto]: a primary-key range."""
    query = (
        select(channels.c.payee)
        .distinct()
        .select_from(payments.join(channels, channels.c.channel_no == payments.c.channel_no))
        .where(payments.c.id > after, payments.c.id <= upto)
    )
    return {str(payee).lower() for payee in conn.execute(query).scalars()}


def payees_of_chain_events(conn: Connection, block: int, log: int) -> set[str]:
    """The payees (lower case) the chain events after (block, log) concern: a settlement's payee, a close's
    channel's payee."""
    rows = conn.execute(
        select(chain_events.c.event, chain_events.c.channel_id, chain_events.c.args).where(after_position(block, log))
    ).all()
    found = {
        str(json.loads(args).get("payee", "")).lower()
        for event, _, args in rows
        if event == HubEvent.CHANNELS_SETTLED.value
    }
    closed = {cid for event, cid, _ in rows if event in CLOSE_EVENTS and cid is not None}
    if closed:
        query = select(channels.c.payee).where(channels.c.channel_id.in_(sorted(closed)))
        found |= {str(payee).lower() for payee in conn.execute(query).scalars()}
    return found


def last_chain_position(conn: Connection) -> ChainPosition:
    found = conn.execute(
        select(chain_events.c.block_number, chain_events.c.log_index)
        .order_by(chain_events.c.block_number.desc(), chain_events.c.log_index.desc())
        .limit(1)
    ).first()
    return ChainPosition(0, -1) if found is None else ChainPosition(int(found[0]), int(found[1]))


# --- webhooks ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookRow:
    webhook_id: str
    payee: str
    url: str
    secret: str
    created_at_us: int
    after_payment: int
    after_block: int
    after_log: int
    failures: int
    next_attempt_us: int
    last_error: str | None


_WEBHOOK = (
    webhooks.c.webhook_id,
    webhooks.c.payee,
    webhooks.c.url,
    webhooks.c.secret,
    webhooks.c.created_at_us,
    webhooks.c.after_payment,
    webhooks.c.after_block,
    webhooks.c.after_log,
    webhooks.c.failures,
    webhooks.c.next_attempt_us,
    webhooks.c.last_error,
)


def add_webhook(conn: Connection, row: WebhookRow, limits: Limits, *, vouched: bool = False) -> Admission:
    """Add `row` if its payee may have one more live webhook (settlement.store.standing). Concurrent adds take turns:
    a transaction lock on PostgreSQL, the single writer on SQLite; else two could pass a count together."""
    if conn.dialect.name != "sqlite":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('settlement.webhooks'))"))
    admission = admit(conn, webhooks.c.payee, webhooks.c.deleted_at_us.is_(None), row.payee, limits, vouched=vouched)
    if admission is not Admission.ADMITTED:
        return admission
    conn.execute(
        insert(webhooks).values(
            webhook_id=row.webhook_id,
            payee=row.payee,
            url=row.url,
            secret=row.secret,
            created_at_us=row.created_at_us,
            after_payment=row.after_payment,
            after_block=row.after_block,
            after_log=row.after_log,
            failures=0,
            next_attempt_us=row.next_attempt_us,
        )
    )
    return Admission.ADMITTED


def payee_webhooks(conn: Connection, payee: str) -> list[WebhookRow]:
    query = select(*_WEBHOOK).where(webhooks.c.payee == payee, webhooks.c.deleted_at_us.is_(None))
    return [WebhookRow(*row) for row in conn.execute(query.order_by(webhooks.c.created_at_us))]


def due_webhooks(conn: Connection, now_us: int) -> list[WebhookRow]:
    query = select(*_WEBHOOK).where(webhooks.c.deleted_at_us.is_(None), webhooks.c.next_attempt_us <= now_us)
    return [WebhookRow(*row) for row in conn.execute(query)]


def delete_webhook(conn: Connection, payee: str, webhook_id: str, now_us: int) -> bool:
    done = conn.execute(
        update(webhooks)
        .where(webhooks.c.webhook_id == webhook_id, webhooks.c.payee == payee, webhooks.c.deleted_at_us.is_(None))
        .values(deleted_at_us=now_us)
    )
    return bool(done.rowcount)


def webhook_delivered(conn: Connection, webhook_id: str, after_payment: int, after_block: int, after_log: int) -> None:
    conn.execute(
        update(webhooks)
        .where(webhooks.c.webhook_id == webhook_id)
        .values(after_payment=after_payment, after_block=after_block, after_log=after_log, failures=0, last_error=None)
    )


def webhook_failed(conn: Connection, webhook_id: str, failures: int, next_attempt_us: int, error: str) -> None:
    conn.execute(
        update(webhooks)
        .where(webhooks.c.webhook_id == webhook_id)
        .values(failures=failures, next_attempt_us=next_attempt_us, last_error=error[:1000])
    )
