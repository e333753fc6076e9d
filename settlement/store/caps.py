"""Spending caps in the store: the caps themselves, and the spend windows the group commit locks and adds to."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, and_, delete, select, text, true, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from settlement.domain.ledger import Cap, WindowKey
from settlement.store.standing import Admission, Limits, admit
from settlement.store.tables import service_meta, spend_windows, spending_caps

GENERATION_KEY = "caps_generation"


def set_cap(
    conn: Connection,
    payee: str,
    payer: str,
    token: str,
    amount: int,
    window: int,
    at_us: int,
    limits: Limits,
    *,
    vouched: bool = False,
) -> Cap | Admission:
    """Add a cap, or change the amount of the one with the same payee, payer, asset and window; when this would be a
    new one, only if the payee may have one more (settlement.store.standing: why not, otherwise). Concurrent calls
    take turns (a transaction lock on PostgreSQL, the single writer on SQLite), so two cannot pass a count together."""
    if conn.dialect.name != "sqlite":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('settlement.caps'))"))
    same = (
        spending_caps.c.payee == payee,
        spending_caps.c.payer == payer,
        spending_caps.c.token == token,
        spending_caps.c.window_seconds == window,
    )
    if conn.execute(select(spending_caps.c.id).where(*same)).first() is None:
        admission = admit(conn, spending_caps.c.payee, true(), payee, limits, vouched=vouched)
        if admission is not Admission.ADMITTED:
            return admission
    insert_of = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    statement = insert_of(spending_caps).values(
        payee=payee, payer=payer, token=token, amount=amount, window_seconds=window, created_at_us=at_us
    )
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["payee", "payer", "token", "window_seconds"], set_={"amount": amount}
        )
    )
    row = conn.execute(select(spending_caps.c.id).where(*same)).scalar_one()
    _changed(conn)
    return Cap(int(row), payee, payer, token, amount, window)


def caps(conn: Connection, payee: str | None = None) -> list[Cap]:
    """Every cap (the rules ingest applies), or those a payee set on its own channels."""
    query = select(spending_caps).order_by(spending_caps.c.id)
    if payee is not None:
        query = query.where(spending_caps.c.payee == payee)
    return [Cap(r.id, r.payee, r.payer, r.token, r.amount, r.window_seconds) for r in conn.execute(query)]


def remove_cap(conn: Connection, cap_id: int, payee: str | None = None) -> bool:
    """Remove a cap (only a payee's own when `payee` is given) and its windows."""
    query = delete(spending_caps).where(spending_caps.c.id == cap_id)
    if payee is not None:
        query = query.where(spending_caps.c.payee == payee)
    if not conn.execute(query).rowcount:
        return False
    conn.execute(delete(spend_windows).where(spend_windows.c.cap_id == cap_id))
    _changed(conn)
    return True


def generation(conn: Connection) -> str | None:
    """A token that changes with every change of the caps (None: none since this store kept one): every process reads
    it four times a second and the caps only when it moved. Reading 10,000 caps took 50 ms of CPU, a fifth of a core
    a process, whether or not any had changed."""
    query = select(service_meta.c.value).where(service_meta.c.key == GENERATION_KEY)
    value = conn.execute(query).scalar_one_or_none()
    return None if value is None else str(value)


def _changed(conn: Connection) -> None:
    insert_of = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    token = secrets.token_hex(8)
    statement = insert_of(service_meta).values(key=GENERATION_KEY, value=token)
    conn.execute(statement.on_conflict_do_update(index_elements=["key"], set_={"value": token}))


def lock_windows(conn: Connection, keys: Sequence[tuple[WindowKey, int]]) -> dict[WindowKey, int]:
    """What each (window, its end) holds, its row made if new and locked until commit (in key order, as every writer
    takes them: after its channels, so two writers never wait on each other in a circle)."""
    if not keys:
        return {}
    ordered = sorted(set(keys))
    insert_of = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    conn.execute(
        insert_of(spend_windows).on_conflict_do_nothing(),
        [
            {"cap_id": cap, "payer": payer, "window_start": start, "window_end": end, "spent": 0}
            for (cap, payer, start), end in ordered
        ],
    )
    return read_windows(conn, [key for key, _ in ordered], lock=conn.dialect.name != "sqlite")


def read_windows(conn: Connection, keys: Sequence[WindowKey], *, lock: bool = False) -> dict[WindowKey, int]:
    if not keys:
        return {}
    columns = (spend_windows.c.cap_id, spend_windows.c.payer, spend_windows.c.window_start)
    query = select(*columns, spend_windows.c.spent).where(tuple_(*columns).in_(list(keys)))
    if lock:
        query = query.order_by(*columns).with_for_update()
    return {WindowKey(int(c), str(p), int(s)): int(spent) for c, p, s, spent in conn.execute(query)}


def save_windows(conn: Connection, spent: Mapping[WindowKey, int]) -> None:
    for (cap, payer, start), amount in spent.items():
        conn.execute(
            update(spend_windows)
            .where(
                and_(
                    spend_windows.c.cap_id == cap,
                    spend_windows.c.payer == payer,
                    spend_windows.c.window_start == start,
                )
            )
            .values(spent=amount)
        )


def prune_windows(conn: Connection, before: int) -> int:
    """Remove windows that ended before unix second `before`."""
    return int(conn.execute(delete(spend_windows).where(spend_windows.c.window_end < before)).rowcount)
