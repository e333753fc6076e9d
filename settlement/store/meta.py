"""Facts about the database itself: the deployment it belongs to (channel ids are only unique within one hub)."""

from __future__ import annotations

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from settlement.errors import ConfigError
from settlement.store.tables import service_meta

DEPLOYMENT_KEY = "deployment"


def bind_deployment(conn: Connection, chain_id: int, address: str) -> None:
    """Claim an empty database for this hub, or refuse one that holds another hub's channels."""
    wanted = f"{chain_id}:{address.lower()}"
    insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    conn.execute(
        insert(service_meta).values(key=DEPLOYMENT_KEY, value=wanted).on_conflict_do_nothing(index_elements=["key"])
    )
    bound = conn.execute(select(service_meta.c.value).where(service_meta.c.key == DEPLOYMENT_KEY)).scalar_one()
    if bound != wanted:
        chain, hub = bound.split(":", 1)
        raise ConfigError(
            f"this database holds the data of hub {hub} on chain {chain}, not of {address} on chain {chain_id}: "
            "point SETTLEMENT_DATABASE_URL at another database"
        )
