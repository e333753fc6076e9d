"""Facts about the database itself: the deployment it belongs to (channel ids are only unique within one hub)."""

from __future__ import annotations

import json
import secrets

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from settlement.domain.model import BlockRef
from settlement.errors import ChainMismatchError, ConfigError
from settlement.store.tables import service_meta

DEPLOYMENT_KEY = "deployment"
CHAIN_INSTANCE_KEY = "chain_instance"
ENGINE_KEY = "engine"
SIGNIN_KEY = "signin_secret"


def _claim(conn: Connection, key: str, wanted: str) -> str:
    """Store `wanted` under `key` unless a value is there; return what is there now."""
    insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    conn.execute(insert(service_meta).values(key=key, value=wanted).on_conflict_do_nothing(index_elements=["key"]))
    return str(conn.execute(select(service_meta.c.value).where(service_meta.c.key == key)).scalar_one())


def bind_deployment(conn: Connection, chain_id: int, address: str, anchor: BlockRef) -> None:
    """Claim an empty database for this hub on this chain instance, or refuse one that belongs to another.

    The chain id and the hub address alone do not name a chain: a restarted devnet redeploys the hub at the same
    address on the same chain id. The deployment block's hash does.
    """
    wanted = f"{chain_id}:{address.lower()}"
    bound = _claim(conn, DEPLOYMENT_KEY, wanted)
    if bound != wanted:
        chain, hub = bound.split(":", 1)
        raise ConfigError(
            f"this database holds the data of hub {hub} on chain {chain}, not of {address} on chain {chain_id}: "
            "point SETTLEMENT_DATABASE_URL at another database"
        )
    instance = _claim(conn, CHAIN_INSTANCE_KEY, f"{anchor.number}:{anchor.hash}")
    if instance != f"{anchor.number}:{anchor.hash}":
        number, block_hash = instance.split(":", 1)
        raise ChainMismatchError(
            f"this database belongs to the hub deployed in block {number} ({block_hash}); the chain now has "
            f"{anchor.hash} in block {anchor.number}: the chain was restarted or replaced, and the channels stored "
            "here do not exist on it. Point SETTLEMENT_DATABASE_URL at a new database"
        )


def record_engine(conn: Connection, facts: dict[str, object]) -> None:
    """What the running settlement engine works with (its interval, its sender), for operators' read-only commands:
    the CLI's own settings may differ from the engine's."""
    value = json.dumps(facts, sort_keys=True)
    insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    statement = insert(service_meta).values(key=ENGINE_KEY, value=value)
    conn.execute(statement.on_conflict_do_update(index_elements=["key"], set_={"value": value}))


def engine_facts(conn: Connection) -> dict[str, object] | None:
    value = conn.execute(select(service_meta.c.value).where(service_meta.c.key == ENGINE_KEY)).scalar_one_or_none()
    return None if value is None else dict(json.loads(value))


def engine_interval(conn: Connection) -> float | None:
    """Seconds between the running engine's regular batches, as it recorded them; None before an engine ran."""
    facts = engine_facts(conn)
    return None if facts is None else float(str(facts["settleInterval"]))


def signin_secret(conn: Connection) -> bytes:
    """The store's key for sign-in challenges and tokens, made by the first process that asks (so that every process
    on this store accepts what another issued)."""
    return bytes.fromhex(_claim(conn, SIGNIN_KEY, secrets.token_hex(32)))
