"""Risk controls in the store: channels the operator holds, and risk events (what the monitor saw), newest last."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Connection, delete, insert, not_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from settlement.domain.model import ChainPosition, HubEvent, RiskKind
from settlement.store.chainlog import after_position
from settlement.store.tables import chain_events, channel_holds, channels, payments, risk_events


class RiskFinding(NamedTuple):
    """A risk event to record: about a payer, a channel, or both."""

    at_us: int
    kind: RiskKind
    payer: str | None
    channel_id: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class RiskEvent:
    """A recorded risk event, as listed."""

    event_id: int
    at_us: int
    kind: str
    payer: str | None
    channel_id: str | None
    detail: dict[str, Any]


class WatchedChainEvent(NamedTuple):
    """A channel's opening or close request, where it stands in the chain."""

    position: ChainPosition
    event: HubEvent
    channel_id: str | None
    args: dict[str, Any]


def hold(conn: Connection, channel_id: str, reason: str, at_us: int) -> None:
    insert_of = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    statement = insert_of(channel_holds).values(channel_id=channel_id, reason=reason, held_at_us=at_us)
    conn.execute(statement.on_conflict_do_update(index_elements=["channel_id"], set_={"reason": reason}))


def release(conn: Connection, channel_id: str) -> bool:
    return bool(conn.execute(delete(channel_holds).where(channel_holds.c.channel_id == channel_id)).rowcount)


def holds(conn: Connection) -> dict[str, str]:
    return {
        str(cid): str(reason)
        for cid, reason in conn.execute(select(channel_holds.c.channel_id, channel_holds.c.reason))
    }


def record(conn: Connection, findings: list[RiskFinding]) -> None:
    if findings:
        conn.execute(
            insert(risk_events),
            [
                {
                    "at_us": found.at_us,
                    "kind": found.kind.value,
                    "payer": found.payer,
                    "channel_id": found.channel_id,
                    "detail": json.dumps(found.detail),
                }
                for found in findings
            ],
        )


def events_after(conn: Connection, after: int, limit: int, kind: RiskKind | None = None) -> list[RiskEvent]:
    query = select(risk_events).where(risk_events.c.id > after)
    if kind is not None:
        query = query.where(risk_events.c.kind == kind.value)
    rows = conn.execute(query.order_by(risk_events.c.id).limit(limit))
    return [RiskEvent(r.id, r.at_us, r.kind, r.payer, r.channel_id, json.loads(r.detail)) for r in rows]


def chain_events_since(
    conn: Connection, after: ChainPosition, until: ChainPosition, limit: int
) -> list[WatchedChainEvent]:
    """Channel openings and close requests after `after` and up to `until`, in chain order."""
    query = (
        select(
            chain_events.c.block_number,
            chain_events.c.log_index,
            chain_events.c.event,
            chain_events.c.channel_id,
            chain_events.c.args,
        )
        .where(
            after_position(after.block, after.log),
            not_(after_position(until.block, until.log)),
            chain_events.c.event.in_([HubEvent.CHANNEL_OPENED.value, HubEvent.CLOSE_REQUESTED.value]),
        )
        .order_by(chain_events.c.block_number, chain_events.c.log_index)
        .limit(limit)
    )
    return [
        WatchedChainEvent(ChainPosition(b, i), HubEvent(event), cid, json.loads(args))
        for b, i, event, cid, args in conn.execute(query)
    ]


def last_payment_at(conn: Connection, channel_id: str) -> int | None:
    number = select(channels.c.channel_no).where(channels.c.channel_id == channel_id).scalar_subquery()
    query = select(payments.c.accepted_at_us).where(payments.c.channel_no == number)
    found = conn.execute(query.order_by(payments.c.cumulative.desc()).limit(1)).scalar()  # the latest: on its index
    return None if found is None else int(found)
