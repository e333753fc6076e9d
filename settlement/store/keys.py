"""API key rows: who a key speaks for. The store keeps a key's SHA-256 only; the key itself is shown once, when made."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from settlement.store.tables import api_keys


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    role: str
    account: str | None
    name: str
    created_at_us: int
    revoked_at_us: int | None


def add_key(conn: Connection, row: KeyRow, secret_hash: str) -> None:
    conn.execute(
        insert(api_keys).values(
            key_id=row.key_id,
            secret_hash=secret_hash,
            role=row.role,
            account=row.account,
            name=row.name,
            created_at_us=row.created_at_us,
            revoked_at_us=row.revoked_at_us,
        )
    )


def key_by_hash(conn: Connection, secret_hash: str) -> KeyRow | None:
    found = conn.execute(select(*_COLUMNS).where(api_keys.c.secret_hash == secret_hash)).first()
    return None if found is None else KeyRow(*found)


def live_hashes(conn: Connection) -> frozenset[str]:
    """The hashes of every key not revoked."""
    return frozenset(conn.execute(select(api_keys.c.secret_hash).where(api_keys.c.revoked_at_us.is_(None))).scalars())


def list_keys(conn: Connection) -> list[KeyRow]:
    return [KeyRow(*row) for row in conn.execute(select(*_COLUMNS).order_by(api_keys.c.created_at_us))]


def revoke_key(conn: Connection, key_id: str, at_us: int) -> bool:
    """Revoke a live key; False when there is no such live key."""
    done = conn.execute(
        update(api_keys)
        .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at_us.is_(None))
        .values(revoked_at_us=at_us)
    )
    return bool(done.rowcount)


def has_live_key(conn: Connection, role: str) -> bool:
    found = conn.execute(
        select(api_keys.c.key_id).where(api_keys.c.role == role, api_keys.c.revoked_at_us.is_(None)).limit(1)
    ).first()
    return found is not None


_COLUMNS = (
    api_keys.c.key_id,
    api_keys.c.role,
    api_keys.c.account,
    api_keys.c.name,
    api_keys.c.created_at_us,
    api_keys.c.revoked_at_us,
)
