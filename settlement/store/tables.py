"""The schema, as SQLAlchemy Core tables; alembic migrations (settlement/store/migrations) create it.

`channels` holds one row per channel: the chain's facts as the indexer confirmed them and, on PostgreSQL, the latest
accepted voucher (on SQLite that is the channel's highest payment: settlement.store.channels.latest_accepted).
`payments` holds every accepted increment (the audit trail and the idempotency record). `chain_events`,
`indexed_blocks` and `indexer_cursor` let the indexer apply each event once and notice reorganisations.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from settlement.domain.model import END_OF_BLOCK
from settlement.store.types import Amount, amount_checks

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BIGINT ids; SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
ChannelNo = BigInteger().with_variant(Integer(), "sqlite")

HEX32 = 66  # "0x" + 64 hex digits
ADDRESS = 42


def _amount_constraints(table: str, *columns: str) -> list[CheckConstraint]:
    constraints = []
    for column in columns:
        pg, lite = amount_checks(column)
        constraints.append(CheckConstraint(pg, name=f"{column}_amount_pg").ddl_if(dialect="postgresql"))
        constraints.append(CheckConstraint(lite, name=f"{column}_amount_lite").ddl_if(dialect="sqlite"))
    return constraints


channels = Table(
    "channels",
    metadata,
    Column("channel_id", String(HEX32), primary_key=True),
    Column("payer", String(ADDRESS), nullable=False),
    Column("payee", String(ADDRESS), nullable=False),
    Column("token", String(ADDRESS), nullable=False),
    Column("salt", String(HEX32), nullable=False),
    Column("deposit", Amount(), nullable=False),
    Column("settled", Amount(), nullable=False),
    Column("status", SmallInteger(), nullable=False),
    Column("close_deadline", BigInteger(), nullable=True),
    Column("as_of_block", BigInteger(), nullable=False),
    Column("as_of_log", Integer(), nullable=False, server_default=str(END_OF_BLOCK)),
    # The latest accepted voucher on PostgreSQL; on SQLite only for a channel without a payment row (never above its
    # highest payment, which is the latest voucher there): read both through channels.channel_rows / latest_accepted.
    Column("accepted", Amount(), nullable=False),
    Column("signature", LargeBinary(65), nullable=True),
    Column("suspended_reason", Text(), nullable=True),
    # When the payee stopped the channel at the service to close it (`POST /v1/channels/{id}/stop`): no voucher is
    # accepted after it, so the latest voucher the stop answered is the last one (revision 0018).
    Column("stopped_at_us", BigInteger(), nullable=True),
    Column("updated_at_us", BigInteger(), nullable=False),
    # The channel's number in this store: what its payments carry instead of the 66-character id (8 bytes, not 67,
    # in every payment row and in both of its unique indexes). PostgreSQL numbers new rows; SQLite is given one.
    Column("channel_no", ChannelNo, Identity(), nullable=False, unique=True),
    # Raised by every write of the row: the ingest writer judges against its own copy of a channel it wrote last
    # while the stored version is still the one it wrote, and reads the row again when it is not.
    Column("version", BigInteger(), nullable=False, server_default="0"),
    CheckConstraint("status IN (1, 2, 3)", name="status"),
    CheckConstraint("settled <= deposit", name="settled_le_deposit"),
    CheckConstraint("(accepted = 0) = (signature IS NULL)", name="accepted_signed_pg").ddl_if(dialect="postgresql"),
    CheckConstraint("(accepted = 0) = (signature IS NULL)", name="accepted_signed_lite").ddl_if(dialect="sqlite"),
    *_amount_constraints("channels", "deposit", "settled", "accepted"),
    Index(None, "payer"),
    Index(None, "payee", "token"),
    # Half of each page left free: the ingest writer rewrites a channel's row at every group, and a new row version
    # that fits on its page with no indexed column changed is a heap-only update (no entry in any of the four
    # indexes); packed full, 96% of them were not, and the group's write took twice as long.
    postgresql_with={"fillfactor": 50},
)

payments = Table(
    "payments",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("cumulative", Amount(), nullable=False),
    Column("increment", Amount(), nullable=False),
    Column("remaining", Amount(), nullable=False),
    Column("signature", LargeBinary(65), nullable=False),
    Column("reference", String(256), nullable=True),
    Column("accepted_at_us", BigInteger(), nullable=False),
    Column("idempotency_key", String(64), nullable=True),
    Column("channel_no", BigInteger(), nullable=False),
    Column("attempt", String(64), nullable=True),  # the x402 settle that got it accepted (revision 0019)
    UniqueConstraint("channel_no", "cumulative"),
    # SQLite only: on PostgreSQL the per-row check cost the writer 10-30%; there a payment's channel is kept by the
    # group statement's join and by triggers that refuse to delete or renumber a channel (revision 0016).
    ForeignKeyConstraint(["channel_no"], ["channels.channel_no"]).ddl_if(dialect="sqlite"),
    # Partial: a payment without a key costs this index nothing (the hot path's keyless vouchers skip it).
    Index(
        "uq_payments_channel_no_idempotency_key",
        "channel_no",
        "idempotency_key",
        unique=True,
        sqlite_where=text("idempotency_key IS NOT NULL"),
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    CheckConstraint("increment > 0 AND increment <= cumulative", name="increment_positive").ddl_if(
        dialect="postgresql"
    ),
    CheckConstraint("increment > 0 AND increment <= cumulative", name="increment_positive_lite").ddl_if(
        dialect="sqlite"
    ),
    *_amount_constraints("payments", "cumulative", "increment", "remaining"),
    # No (channel_no, id) index: within a channel ids and cumulative amounts rise together (a payment is recorded
    # only above the channel's floor), so the unique (channel_no, cumulative) index serves every per-channel order.
)

chain_events = Table(
    "chain_events",
    metadata,
    Column("block_number", BigInteger(), primary_key=True),
    Column("log_index", Integer(), primary_key=True),
    Column("block_hash", String(HEX32), nullable=False),
    Column("tx_hash", String(HEX32), nullable=False),
    Column("event", String(64), nullable=False),
    Column("channel_id", String(HEX32), nullable=True),
    Column("args", Text(), nullable=False),
    Column("account", String(ADDRESS), nullable=True),  # a Withdrawn event's account; None for the others
    Index(None, "channel_id"),
    Index(
        "ix_chain_events_account",
        "account",
        sqlite_where=text("account IS NOT NULL"),
        postgresql_where=text("account IS NOT NULL"),
    ),
)

indexed_blocks = Table(
    "indexed_blocks",
    metadata,
    Column("number", BigInteger(), primary_key=True),
    Column("hash", String(HEX32), nullable=False),
)

indexer_cursor = Table(
    "indexer_cursor",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("block_number", BigInteger(), nullable=False),
    Column("block_hash", String(HEX32), nullable=True),
    Column("updated_at_us", BigInteger(), nullable=False),
)

service_meta = Table(
    "service_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text(), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(16), primary_key=True),  # the key's public prefix, shown in listings
    Column("secret_hash", String(64), nullable=False, unique=True),  # SHA-256 of the whole key, hex; never the key
    Column("role", String(16), nullable=False),
    Column("account", String(ADDRESS), nullable=True),  # the payee or payer a key of that role reads as
    Column("name", String(100), nullable=False),
    Column("created_at_us", BigInteger(), nullable=False),
    Column("revoked_at_us", BigInteger(), nullable=True),
)

webhooks = Table(
    "webhooks",
    metadata,
    Column("webhook_id", String(32), primary_key=True),
    Column("payee", String(ADDRESS), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("secret", String(80), nullable=False),  # kept to sign with (HMAC): a copy of the store can forge deliveries
    Column("created_at_us", BigInteger(), nullable=False),
    Column("deleted_at_us", BigInteger(), nullable=True),
    # Where its deliveries stand: the last payment id and chain event position delivered (payee_events.Position).
    Column("after_payment", BigInteger(), nullable=False),
    Column("after_block", BigInteger(), nullable=False),
    Column("after_log", Integer(), nullable=False),
    Column("failures", Integer(), nullable=False, server_default="0"),
    Column("next_attempt_us", BigInteger(), nullable=False),
    Column("last_error", Text(), nullable=True),
    Index(None, "payee"),
    # The sender's look for due webhooks at every tick: live ones only (deleted webhooks are kept, and add up).
    Index(
        "ix_webhooks_due",
        "next_attempt_us",
        sqlite_where=text("deleted_at_us IS NULL"),
        postgresql_where=text("deleted_at_us IS NULL"),
    ),
)

channel_holds = Table(
    "channel_holds",
    metadata,
    Column("channel_id", String(HEX32), primary_key=True),
    Column("reason", String(500), nullable=False),
    Column("held_at_us", BigInteger(), nullable=False),
)

spending_caps = Table(
    "spending_caps",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("payee", String(ADDRESS), nullable=False),  # an address, or "*": the operator's cap over every payee
    Column("payer", String(ADDRESS), nullable=False),  # an address, or "*": every payer, each on its own count
    Column("token", String(ADDRESS), nullable=False),
    Column("amount", Amount(), nullable=False),
    Column("window_seconds", BigInteger(), nullable=False),
    Column("created_at_us", BigInteger(), nullable=False),
    UniqueConstraint("payee", "payer", "token", "window_seconds"),
    CheckConstraint("window_seconds > 0", name="window_positive"),
    *_amount_constraints("spending_caps", "amount"),
)

# What a payer spent in one window of one cap: locked and updated by the group commit that adds to it, so a cap holds
# across every process on the store. No foreign key: a cap removed while a group is in flight must not fail the group.
spend_windows = Table(
    "spend_windows",
    metadata,
    Column("cap_id", BigInteger(), primary_key=True),
    Column("payer", String(ADDRESS), primary_key=True),
    Column("window_start", BigInteger(), primary_key=True),
    Column("window_end", BigInteger(), nullable=False),
    Column("spent", Amount(), nullable=False),
    *_amount_constraints("spend_windows", "spent"),
    Index(None, "window_end"),  # ended windows are pruned
)

risk_events = Table(
    "risk_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at_us", BigInteger(), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("payer", String(ADDRESS), nullable=True),
    Column("channel_id", String(HEX32), nullable=True),
    Column("detail", Text(), nullable=False),  # JSON: counts, window, the refusal code
)

settlement_batches = Table(
    "settlement_batches",
    metadata,
    Column("batch_id", String(36), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("sender", String(ADDRESS), nullable=False),
    Column("nonce", BigInteger(), nullable=False),
    Column("tx_hash", String(HEX32), nullable=True),
    Column("block_number", BigInteger(), nullable=True),
    Column("gas_used", BigInteger(), nullable=True),
    Column("gas_price", Amount(), nullable=True),
    Column("error", Text(), nullable=True),
    Column("created_at_us", BigInteger(), nullable=False),
    Column("updated_at_us", BigInteger(), nullable=False),
    Column("nonce_used_since_us", BigInteger(), nullable=True),  # first seen used with no receipt of ours
    CheckConstraint("status IN ('pending', 'sent', 'confirmed', 'failed')", name="status"),
    Index(None, "status"),
    Index(None, "created_at_us"),  # the engine reads the newest batch every tick
    Index(None, "updated_at_us"),  # and the last hour's spend at every regular check
)

settlement_entries = Table(
    "settlement_entries",
    metadata,
    Column("batch_id", String(36), ForeignKey("settlement_batches.batch_id"), primary_key=True),
    Column("channel_id", String(HEX32), ForeignKey("channels.channel_id"), primary_key=True),
    Column("cumulative", Amount(), nullable=False),
    Column("signature", LargeBinary(65), nullable=False),
    Column("outcome", SmallInteger(), nullable=True),
    Column("close_phase", SmallInteger(), nullable=True),  # settlement.settler.ClosePhase; NULL: a regular entry
    Index(None, "channel_id"),
)

settlement_txs = Table(
    "settlement_txs",
    metadata,
    Column("tx_hash", String(HEX32), primary_key=True),
    Column("batch_id", String(36), ForeignKey("settlement_batches.batch_id"), nullable=False),
    Column("nonce", BigInteger(), nullable=False),
    Column("max_fee", Amount(), nullable=False),
    Column("priority_fee", Amount(), nullable=False),
    Column("raw", LargeBinary(), nullable=False),
    Column("sent_at_us", BigInteger(), nullable=True),
    Column("created_at_us", BigInteger(), nullable=False),
    Index(None, "batch_id"),
)

engine_alerts = Table(
    "engine_alerts",
    metadata,
    Column("kind", String(64), primary_key=True),
    Column("subject", String(HEX32), primary_key=True),
    Column("last_at_us", BigInteger(), nullable=False),
)
