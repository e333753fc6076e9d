"""The store on both backends: exact amounts, CHECK constraints, migrations, and concurrent writers."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from eth_account.signers.local import LocalAccount
from sqlalchemy import event, text
from sqlalchemy.pool import QueuePool

from settlement.chain.deployment import Deployment
from settlement.domain.ledger import ANY, Cap, Rules, Verdict
from settlement.domain.model import ETH, BlockRef, Channel, ChannelId, ChannelStatus, Receipt, Voucher, utcnow
from settlement.errors import (
    ChainMismatchError,
    ConfigError,
    SettlementError,
    StaleVoucherError,
    StoreError,
    StoreUnavailableError,
)
from settlement.ingest.pipeline import Ingestor
from settlement.server.config import Settings
from settlement.server.metrics import Metrics
from settlement.server.service import Service
from settlement.store import Database
from settlement.store import caps as caps_q
from settlement.store import channels as channel_q
from settlement.store import settlements as batch_q
from settlement.store.database import head_revision
from settlement.store.meta import bind_deployment
from settlement.store.standing import Limits
from tests.hub_helpers import Channel as HubChannel
from tests.hub_helpers import a_channel, end_sessions, store_at_revision, wait_until

MAX = 2**256 - 1


def test_migrations_reach_head_and_are_idempotent(db: Database) -> None:
    assert db.revision() == head_revision() is not None
    db.migrate()
    assert db.revision() == head_revision()


def test_every_read_of_a_channel_gives_its_latest_voucher(db: Database) -> None:
    """On SQLite a channel's latest voucher is its highest payment, not a column the writer rewrites (on PostgreSQL
    it is the row's): each read of whole channels, the settler's and the watchtower's included, gives the same."""
    now = utcnow()
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(1, deposit=100), now)
        for cumulative, increment, mark in ((7, 7, 1), (30, 23, 2)):  # two groups
            receipt = Receipt(a_channel(1).channel_id, cumulative, increment, 100 - cumulative, now)
            channel_q.record_payments(conn, [(receipt, bytes([mark]) * 65)])
        channel_q.save_chain_state(conn, replace(a_channel(1, deposit=100), status=ChannelStatus.CLOSING), now)
    cid = a_channel(1).channel_id
    with db.write() as conn:
        reads = {
            "get_channel": channel_q.get_channel(conn, cid),
            "list_channels": channel_q.list_channels(conn).items[0],
            "lock_channels": channel_q.lock_channels(conn, [cid])[cid],
            "read_versioned": channel_q.read_versioned(conn, [cid])[cid].channel,
            "settleable": batch_q.settleable(conn)[0],
            "settleable, ranked": batch_q.settleable(conn, limit=5)[0],
            "closing_with_work": batch_q.closing_with_work(conn)[0].channel,
            "closing_channels": batch_q.closing_channels(conn)[0],
        }
        stamp = channel_q.lock_versions(conn, [cid]).stamps[cid]
        summary = channel_q.payee_summary(conn, a_channel(1).payee)
        unsettled = channel_q.unsettled_by_token(conn)
    assert {name: (c.accepted, c.signature) for name, c in reads.items() if c is not None} == {
        name: (30, bytes([2]) * 65) for name in reads
    }
    assert stamp.accepted == 30
    assert [(a.accepted, a.unsettled) for a in summary] == [(30, 30)]
    assert unsettled == {ETH: 30}


def test_amounts_up_to_2_pow_256_minus_1_are_exact(db: Database) -> None:
    now = utcnow()
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(), now)
        channel_q.record_payments(conn, [(Receipt(a_channel().channel_id, MAX, MAX - 1, 0, now), b"\x01" * 65)])
    with db.read() as conn:
        stored = channel_q.get_channel(conn, a_channel().channel_id)
        receipt = channel_q.receipts_for(conn, [(a_channel().channel_id, MAX)])
        raw = conn.execute(text("SELECT cumulative FROM payments")).scalar_one()  # the channel's latest voucher
    assert stored is not None and (stored.deposit, stored.accepted) == (MAX, MAX)
    assert receipt[(a_channel().channel_id, MAX)].increment == MAX - 1
    assert (int.from_bytes(raw, "big") if db.is_sqlite else int(raw)) == MAX  # not a float that rounds back


@pytest.mark.parametrize("pair", [(2**63 - 1, 2**63), (5, 2**63), (2**63, 2**64), (2**64, 2**255), (0, 1)])
def test_amounts_compare_in_sql_as_numbers_across_sqlites_two_forms(db: Database, pair: tuple[int, int]) -> None:
    """SQLite keeps an amount below 2^63 as an integer and one above as 32 bytes: the store's SQL comparisons
    (`accepted > settled`, `settled <= deposit`, a payment below a bound) still order them as numbers."""
    low, high = pair
    now = utcnow()
    with db.write() as conn:
        channel_q.insert_channel(conn, replace(a_channel(), deposit=MAX, settled=low), now)
        channel_q.record_payments(conn, [(Receipt(a_channel().channel_id, high, high, MAX - high, now), b"\x01" * 65)])
    with db.read() as conn:
        unsettled = channel_q.unsettled_by_token(conn)
        ranked = batch_q.settleable(conn, limit=1)
        forms = (
            conn.execute(text("SELECT typeof(settled), typeof(cumulative) FROM channels, payments")).one()
            if db.is_sqlite
            else ()
        )
    assert unsettled == {ETH: high - low}
    assert [c.accepted for c in ranked] == [high]
    if db.is_sqlite:
        assert tuple(forms) == tuple("integer" if v < 2**63 else "blob" for v in (low, high))
    with pytest.raises(StoreError), db.write() as conn:  # accepted below settled: the CHECK sees the order too
        conn.execute(text("UPDATE channels SET deposit = settled, settled = (SELECT cumulative FROM payments)"))


@pytest.mark.parametrize(
    "stored",
    [
        "x'0000000000000000000000000000000000000000000000000000000000000005'",  # 5 as a blob: a second form of 5
        "x'0100'",  # a blob of the wrong length
        "'5'",  # text
        "5.0",  # a real
        "-1",
    ],
)
def test_sqlite_refuses_an_amount_in_any_other_form(tmp_path: Path, stored: str) -> None:
    """Each amount has exactly one form on SQLite (what keeps its comparisons numeric); anything else is refused.
    (PostgreSQL's NUMERIC has one form: nothing to test there.)"""
    db = Database(f"sqlite:///{tmp_path / 'settlement.db'}")
    db.migrate()
    try:
        with db.write() as conn:
            channel_q.insert_channel(conn, a_channel(deposit=10), utcnow())
        with pytest.raises(StoreError), db.write() as conn:
            conn.execute(text(f"UPDATE channels SET settled = {stored}"))
        with db.write() as conn:  # the one form of the same amount is taken
            conn.execute(text("UPDATE channels SET settled = 5"))
    finally:
        db.dispose()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE channels SET settled = deposit, deposit = settled",  # settled > deposit
        "UPDATE channels SET status = 9",
        "UPDATE channels SET accepted = {zero}, signature = (SELECT signature FROM payments)",  # signed, accepted 0
        "UPDATE payments SET increment = {zero}",
        "UPDATE payments SET increment = cumulative || '0'",
    ],
)
def test_check_constraints_guard_the_money_columns(db: Database, statement: str) -> None:
    now = utcnow()
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(deposit=10), now)
        conn.execute(text("UPDATE channels SET settled = :s"), {"s": 5})
        channel_q.record_payments(conn, [(Receipt(a_channel().channel_id, 7, 7, 3, now), b"\x01" * 65)])
    zero = "0"
    if "||" in statement and not db.is_sqlite:
        statement = "UPDATE payments SET increment = cumulative * 10"
    with pytest.raises(StoreError), db.write() as conn:
        conn.execute(text(statement.format(zero=zero)))


@pytest.mark.faults
def test_settleable_with_a_limit_takes_closing_channels_then_the_largest_amounts(db: Database) -> None:
    """The settler reads one batch's worth, ranked by the database: closing (nearest deadline) first, then the
    largest unsettled amounts, above 2^64 included (text on SQLite, ranked by its float value)."""
    now = utcnow()
    amounts = {1: 5, 2: 2**70, 3: 7, 4: 2**70 + 2**30, 5: 3, 6: 1}
    closing = {5: 2_000, 6: 1_000}  # channel -> close deadline
    with db.write() as conn:
        for n, amount in amounts.items():
            channel = a_channel(n)
            if n in closing:
                channel = replace(channel, status=ChannelStatus.CLOSING, close_deadline=closing[n])
            channel_q.insert_channel(conn, channel, now)
            receipt = Receipt(channel.channel_id, amount, amount, 0, now)
            channel_q.record_payments(conn, [(receipt, b"\x01" * 65)])
    with db.read() as conn:
        everything = batch_q.settleable(conn)
        top = batch_q.settleable(conn, limit=4)
    assert len(everything) == 6
    assert [int(c.channel_id, 16) for c in top] == [6, 5, 4, 2]


def test_concurrent_writers_on_separate_handles_never_see_database_locked(store_url: str) -> None:
    handles = [Database(store_url) for _ in range(4)]
    handles[0].migrate()
    now = utcnow()
    errors: list[Exception] = []

    def write(i: int) -> None:
        db = handles[i % len(handles)]
        try:
            with db.write() as conn:
                channel_q.insert_channel(conn, a_channel(i, deposit=i), now)
        except Exception as ex:
            errors.append(ex)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(200)))
    assert errors == []
    with handles[0].read() as conn:
        assert channel_q.count_channels(conn) == 200
    for handle in handles:
        handle.dispose()


@pytest.mark.faults
def test_fifty_concurrent_submissions_to_one_channel(
    make_service: Callable[..., Service],
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    """Two services (as two processes would) share the store; the highest valid cumulative wins, nothing is lost."""
    services = [make_service(), make_service()]
    hub_channel = open_channel(accounts[5], accounts[6].address, amount=40)
    cid = hub_channel.hex_id
    amounts = [random.Random(7).randint(1, 45) for _ in range(50)]
    vouchers = [Voucher(cid, a, sign(accounts[5], hub_channel.id, a)) for a in amounts]
    start = threading.Barrier(50)

    def submit(i: int) -> object:
        start.wait()
        return services[i % 2].ingestor.ingest([vouchers[i]])[0]

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(submit, range(50)))

    for amount, outcome in zip(amounts, outcomes, strict=True):
        if amount > 40:
            assert isinstance(outcome, SettlementError) and outcome.code == "amount_exceeds_deposit"
        else:
            assert isinstance(outcome, Verdict | StaleVoucherError), outcome
    with services[0].db.read() as conn:
        channel = channel_q.get_channel(conn, cid)
        payments = channel_q.list_payments(conn, cid, limit=1000).items
    assert channel is not None
    new = sorted(o.receipt.cumulative for o in outcomes if isinstance(o, Verdict) and o.new)
    assert channel.accepted == max(new)
    assert sorted(p.cumulative for p in payments) == new  # every 201 is stored, and nothing else
    assert sum(p.increment for p in payments) == channel.accepted  # increments chain up without gaps or overlap
    assert channel.accepted == max(a for a in amounts if a <= 40)  # the highest valid cumulative wins


def test_a_database_serves_one_deployment_only(
    service_settings: Callable[..., Settings], make_service: Callable[..., Service], hub_deployment: Deployment
) -> None:
    make_service()  # binds the store to the session hub
    db = Database(service_settings().database_url)
    assert hub_deployment.block_hash is not None
    anchor = BlockRef(hub_deployment.block_number, hub_deployment.block_hash)
    try:
        with db.write() as conn:
            bind_deployment(conn, hub_deployment.chain_id, hub_deployment.address.upper().replace("0X", "0x"), anchor)
        with pytest.raises(ConfigError, match="holds the data of hub"), db.write() as conn:
            bind_deployment(conn, hub_deployment.chain_id, "0x" + "12" * 20, anchor)
        with pytest.raises(ConfigError, match="on chain"), db.write() as conn:
            bind_deployment(conn, hub_deployment.chain_id + 1, hub_deployment.address, anchor)
        other_instance = BlockRef(hub_deployment.block_number, "0x" + "ab" * 32)
        with pytest.raises(ChainMismatchError, match="the chain was restarted or replaced"), db.write() as conn:
            bind_deployment(conn, hub_deployment.chain_id, hub_deployment.address, other_instance)
    finally:
        db.dispose()


@pytest.mark.parametrize("paid_before", [False, True], ids=["new-channels", "channels-the-writer-holds"])
def test_one_voucher_the_store_refuses_never_fails_its_group(
    paid_before: bool,
    make_service: Callable[..., Service],
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On PostgreSQL a NUL byte in a reference failed the whole group commit: every voucher in it got 500, and the
    bad one was never stored, so it could be replayed forever (15 % of an honest stream failed). The API refuses NUL
    now; behind it, the writer isolates whatever the store refuses. Here the store refuses one voucher of ten (a
    NUL reference on PostgreSQL, which only the writer sees; an injected refusal on SQLite, which stores NUL). With
    channels the writer holds, PostgreSQL's group is judged in memory and its statement sent in pipeline mode, where
    the refusal comes: the same isolation."""
    service = make_service()
    channels = [open_channel(accounts[5], accounts[6].address, amount=1_000) for _ in range(10)]
    service.indexer.catch_up()
    if paid_before:
        earlier = [Voucher(c.hex_id, 50, sign(c.payer, c.id, 50)) for c in channels]
        first = service.ingestor.submit(earlier, [service.ingestor.recover(v) for v in earlier]).result()
        assert all(isinstance(o, Verdict) and o.new for o in first)
    vouchers = [
        Voucher(c.hex_id, 100, sign(c.payer, c.id, 100), reference="a\x00b" if n == 3 else f"ok-{n}")
        for n, c in enumerate(channels)
    ]
    if store_url.startswith("sqlite"):
        real = channel_q.record_payments

        def refuse_nul(conn: Any, accepted: Any, numbers: Any = None, **options: Any) -> set[ChannelId]:
            if any("\x00" in (r.reference or "") for r, _ in accepted):
                raise StoreError("injected: the store refuses this value")
            return real(conn, accepted, numbers, **options)

        monkeypatch.setattr(channel_q, "record_payments", refuse_nul)
    outcomes = service.ingestor.submit(vouchers, [service.ingestor.recover(v) for v in vouchers]).result()
    codes = [o.code if isinstance(o, SettlementError) else "accepted" for o in outcomes]
    assert codes == ["accepted"] * 3 + ["store_error"] + ["accepted"] * 6
    refused = outcomes[3]
    assert isinstance(refused, StoreError)
    assert refused.message == "the voucher was not stored: the store refused it (store_error)"  # no database text
    with service.db.read() as conn:
        stored = {cid: c.accepted for cid, c in channel_q.lock_channels(conn, [v.channel_id for v in vouchers]).items()}
    assert stored == {v.channel_id: ((50 if paid_before else 0) if n == 3 else 100) for n, v in enumerate(vouchers)}


def test_a_store_error_names_an_incident_not_the_databases_text(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(store_url)
    db.migrate()
    try:
        with pytest.raises(StoreError) as info, db.write() as conn:
            conn.execute(text("INSERT INTO service_meta (key, value) VALUES ('k', NULL)"))
    finally:
        db.dispose()
    assert re.fullmatch(
        r"the (sqlite|postgresql) store refused the operation \(logged as [0-9a-f]{12}\)", info.value.message
    )
    incident = info.value.message[-13:-1]
    assert f"store incident {incident}" in caplog.text and "service_meta" in caplog.text  # the detail is in the log


def _one(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(text("SELECT 1")).scalar_one())


@pytest.mark.postgres
def test_a_pooled_connection_the_server_ended_while_idle_is_replaced_unseen(fresh_postgres: str) -> None:
    db = Database(fresh_postgres, ping_after_idle=0.05)
    try:
        assert _one(db) == 1  # one connection, back in the pool
        assert end_sessions(fresh_postgres) == 1
        time.sleep(0.1)
        assert _one(db) == 1  # pinged on its way out of the pool, found dead, replaced
        assert cast(QueuePool, db.engine.pool).checkedin() == 1
    finally:
        db.dispose()


@pytest.mark.postgres
def test_a_quiet_service_keeps_using_its_last_connection(fresh_postgres: str) -> None:
    """After a burst opened several connections, one request at a time runs on the one used last, not on each in
    turn: its PostgreSQL backend stays warm, and the others idle (and are pinged before their next use)."""
    db = Database(fresh_postgres)
    try:
        with db.read() as a, db.read() as b, db.read() as c:  # a burst: three transactions at once
            burst = {conn.execute(text("SELECT pg_backend_pid()")).scalar_one() for conn in (a, b, c)}
        quiet = []
        for _ in range(6):
            with db.read() as conn:
                quiet.append(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
    finally:
        db.dispose()
    assert len(burst) == 3
    assert len(set(quiet)) == 1 and quiet[0] in burst


@pytest.mark.postgres
def test_a_connection_reused_at_once_is_not_pinged_and_one_dead_since_fails_one_transaction_only(
    fresh_postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The price of not pinging at every checkout (a round trip per transaction): a connection used a moment ago
    that died since fails the transaction that takes it (StoreUnavailableError, a 503); the ones after it do not."""
    db = Database(fresh_postgres, ping_after_idle=60.0)
    pings: list[object] = []
    ping = db.engine.dialect.do_ping

    def counted_ping(connection: Any) -> bool:
        pings.append(connection)
        return ping(connection)

    monkeypatch.setattr(db.engine.dialect, "do_ping", counted_ping)
    try:
        assert [_one(db) for _ in range(3)] == [1, 1, 1]
        assert end_sessions(fresh_postgres) == 1
        with pytest.raises(StoreUnavailableError):
            _one(db)
        assert [_one(db) for _ in range(3)] == [1, 1, 1]
        assert pings == []
    finally:
        db.dispose()


def _deposit_of(db: Database, channel_id: str) -> int | None:
    with db.read() as conn:
        found = channel_q.get_channel(conn, channel_id)
    return None if found is None else found.deposit


def test_a_writer_keeps_its_connection_between_quick_transactions_and_gives_it_back_idle_or_failed(
    store_url: str,
) -> None:
    """The ingest writer's connection: one checkout for a run of transactions, not one each; back to the pool once
    idle for `ping_after_idle` (to be pinged before its next use) and after a failed transaction, rolled back."""
    db = Database(store_url, ping_after_idle=0.3)
    db.migrate()
    checkouts: list[object] = []
    event.listen(db.engine, "checkout", lambda *_: checkouts.append(None))
    writer = db.writer_connection()
    pool = cast(QueuePool, db.engine.pool)
    try:
        for n in range(1, 6):
            with writer.write() as conn:
                channel_q.insert_channel(conn, a_channel(n, deposit=100 * n), utcnow())
        assert (len(checkouts), pool.checkedout()) == (1, 1)  # one connection for all five, still held
        time.sleep(0.4)
        with writer.write() as conn:
            channel_q.insert_channel(conn, a_channel(6, deposit=600), utcnow())
        assert (len(checkouts), pool.checkedout()) == (2, 1)  # given back after idling, taken again
        with pytest.raises(ValueError), writer.write() as conn:
            channel_q.insert_channel(conn, a_channel(7, deposit=700), utcnow())
            raise ValueError("the transaction fails after its write")
        assert pool.checkedout() == 0  # given back, rolled back
        with writer.write() as conn:
            channel_q.insert_channel(conn, a_channel(8, deposit=800), utcnow())
        assert len(checkouts) == 3
        assert [_deposit_of(db, a_channel(n).channel_id) for n in (1, 5, 6, 7, 8)] == [100, 500, 600, None, 800]
    finally:
        writer.close()
        assert pool.checkedout() == 0
        db.dispose()


@pytest.mark.postgres
def test_a_writer_connection_the_server_ended_fails_one_transaction_or_none_if_it_had_idled(
    fresh_postgres: str,
) -> None:
    """A held connection that died while in use moments ago fails the one transaction that takes it (503, nothing
    written), as a pooled one does; one that died while idle longer than `ping_after_idle` is replaced unseen."""
    db = Database(fresh_postgres, ping_after_idle=0.3)
    db.migrate()
    writer = db.writer_connection()
    try:
        with writer.write() as conn:
            channel_q.insert_channel(conn, a_channel(1, deposit=100), utcnow())
        assert end_sessions(fresh_postgres) == 1
        with pytest.raises(StoreUnavailableError), writer.write() as conn:
            channel_q.insert_channel(conn, a_channel(2, deposit=200), utcnow())
        with writer.write() as conn:
            channel_q.insert_channel(conn, a_channel(3, deposit=300), utcnow())
        assert end_sessions(fresh_postgres) == 1
        time.sleep(0.4)
        with writer.write() as conn:  # idle long enough: pinged on its way out of the pool, found dead, replaced
            channel_q.insert_channel(conn, a_channel(4, deposit=400), utcnow())
        assert [_deposit_of(db, a_channel(n).channel_id) for n in (1, 2, 3, 4)] == [100, None, 300, 400]
    finally:
        writer.close()
        db.dispose()


def test_the_migrations_build_exactly_the_schema_the_tables_describe(db: Database) -> None:
    """tables.py and the migrations describe the schema twice; alembic's compare_metadata finds any drift (a column,
    an index, a constraint, a type) between the migrated database and the metadata."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from settlement.store.tables import metadata

    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        drift = [d for d in compare_metadata(context, metadata) if not _not_this_stores(d, conn.dialect.name)]
    assert drift == []


def test_a_paid_channel_is_never_deleted_or_renumbered_and_a_payment_never_lacks_its_channel(db: Database) -> None:
    """The audit trail's integrity on both stores: SQLite by its foreign key, PostgreSQL by the group statement's join
    and the triggers of revision 0016 (its per-row foreign key check cost the writer 10-30%)."""
    now = utcnow()
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(1, deposit=100), now)
        channel_q.record_payments(conn, [(Receipt(a_channel(1).channel_id, 5, 5, 95, now), b"\x01" * 65)])
    number = _channel_number(db, 1)
    refusals = [
        "DELETE FROM channels",
        f"DELETE FROM channels WHERE channel_no = {number}",
        f"UPDATE channels SET channel_no = {number + 1000} WHERE channel_no = {number}",
    ]
    if not db.is_sqlite:
        refusals.append("TRUNCATE channels CASCADE")  # else: channels emptied, payments orphaned
    for statement in refusals:
        with pytest.raises(StoreError) as info, db.write() as conn:
            conn.execute(text(statement))
        assert type(info.value.__cause__).__name__ == "IntegrityError", statement
    with pytest.raises(StoreError) as info, db.write() as conn:  # a number no channel has: the group fails whole
        channel_q.record_payments(
            conn,
            [
                (Receipt(a_channel(1).channel_id, 6, 1, 94, now), b"\x02" * 65),
                (Receipt(a_channel(2).channel_id, 1, 1, 99, now), b"\x03" * 65),
            ],
            {a_channel(1).channel_id: number, a_channel(2).channel_id: number + 1000},
        )
    assert type(info.value.__cause__).__name__ == "IntegrityError"
    with db.read() as conn:
        kept = [r.cumulative for r in channel_q.list_payments(conn, a_channel(1).channel_id).items]
        counts = conn.execute(
            text("SELECT count(*), count(c.channel_no) FROM payments p LEFT JOIN channels c USING (channel_no)")
        ).one()
    assert kept == [5]
    assert tuple(counts) == (1, 1)  # one payment, and it has its channel


def _channel_number(db: Database, n: int) -> int:
    with db.read() as conn:
        return channel_q.channel_numbers(conn, [a_channel(n).channel_id])[a_channel(n).channel_id]


def _not_this_stores(diff: Any, dialect: str) -> bool:
    """alembic's version table is not in our metadata; a constraint declared for another backend only (`ddl_if`)
    is not in this store's schema (alembic does not read `ddl_if`)."""
    if not isinstance(diff, tuple):
        return False
    if diff[0] == "remove_table":
        return bool(diff[1].name == "alembic_version")
    if diff[0] != "add_fk":
        return False
    from settlement.store.tables import metadata

    declared = {c.name: c for c in metadata.tables[diff[1].table.name].constraints}[diff[1].name]
    only = declared._ddl_if
    return only is not None and only.dialect not in (None, dialect)


@pytest.mark.parametrize("held_max", [100_000, 1])
def test_a_writer_holding_a_channel_judges_what_another_process_or_the_indexer_wrote_since(
    db: Database, held_max: int
) -> None:
    """Each ingest writer keeps the channels it wrote and judges the next group against its own copy while the
    stored version is the one it wrote. Two writers (two processes on one store) take turns on one channel, and the
    indexer's write (a confirmed top-up, then a close) lands between their groups: each judges what is stored, never
    its own older copy (which would have paid 5 twice, refused the top-up's money and taken a voucher after the
    close). With `held_max` 1 the writer forgets what it held after each group: the same answers."""
    payer = bytes.fromhex("aa" * 20)
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(1, deposit=100), utcnow())
        channel_q.insert_channel(conn, a_channel(2, deposit=100), utcnow())
    cid, other = a_channel(1).channel_id, a_channel(2).channel_id
    first, second = (
        Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0, held_max=held_max) for _ in range(2)
    )

    def pay(writer: Ingestor, *amounts: int) -> list[str]:
        vouchers = [
            Voucher(channel_id, amount, bytes(65)) for channel_id, amount in zip((cid, other), amounts, strict=False)
        ]
        outcomes = writer.submit(vouchers, [payer] * len(vouchers)).result()
        return [
            o.code if isinstance(o, SettlementError) else f"{'new' if o.new else 'again'} +{o.receipt.increment}"
            for o in outcomes
        ]

    for writer in (first, second):
        writer.start()
    try:
        assert pay(first, 10, 1) == ["new +10", "new +1"]
        assert pay(second, 20) == ["new +10"]
        assert pay(first, 15, 2) == ["stale_voucher", "new +1"]  # its copy said 10: 15 would have paid 5 twice
        assert pay(first, 25, 3) == ["new +5", "new +1"]
        with db.write() as conn:  # the indexer confirms a top-up
            channel_q.save_chain_state(conn, replace(a_channel(1), deposit=200), utcnow())
        assert pay(first, 150, 4) == ["new +125", "new +1"]  # its copy's deposit was 100
        with db.write() as conn:  # and then the close
            channel_q.save_chain_state(conn, replace(a_channel(1), deposit=200, status=ChannelStatus.CLOSED), utcnow())
        assert pay(first, 160, 5) == ["channel_closed", "new +1"]
        assert pay(second, 170) == ["channel_closed"]
    finally:
        for writer in (first, second):
            writer.stop()
    with db.read() as conn:
        stored = [p.increment for p in reversed(channel_q.list_payments(conn, cid).items)]
        held = channel_q.get_channel(conn, other)
    assert stored == [10, 10, 5, 125]
    assert held is not None and held.accepted == 5


def _group_writes(writer: Ingestor) -> dict[str, int]:
    get = writer.metrics.registry.get_sample_value
    hows = ("held", "ahead", "locked", "moved")
    writes = {how: get("settlement_ingest_group_writes_total", {"how": how}) for how in hows}
    return {how: int(n or 0) for how, n in writes.items()}


def test_a_writer_writes_against_its_own_copies_in_one_statement_and_never_answers_from_a_moved_one(
    db: Database,
) -> None:
    """Issue 20, fewer lock round trips per group: on PostgreSQL a group whose channels the writer holds is judged
    against its copies and written in one statement that locks each row only at the copy's version, with no lock
    statement first. When the indexer moved a channel since (a close, a top-up), that write is rolled back (`moved`)
    and the group is written again under row locks, judged on what is stored: the voucher after the close is refused,
    not taken on the copy's "open"; the voucher the copy's deposit refused is taken once the top-up is stored. Its
    answers are checked the same way when no payment of the group touched the channel (a refusal alone). A channel
    found moved is locked first at its next group, then written against its copy again. SQLite's writer holds the
    whole database and always reads what it locks: the same answers, every group `locked`."""
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(1, deposit=100), utcnow())
        channel_q.insert_channel(conn, a_channel(2, deposit=100), utcnow())
    one, two = a_channel(1).channel_id, a_channel(2).channel_id
    payer = bytes.fromhex("aa" * 20)
    writer = Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0)
    writer.start()

    def pay(*vouchers: tuple[ChannelId, int]) -> list[str]:
        outcomes = writer.submit([Voucher(cid, amount, bytes(65)) for cid, amount in vouchers], [payer] * len(vouchers))
        return [o.code if isinstance(o, SettlementError) else f"new +{o.receipt.increment}" for o in outcomes.result()]

    def indexer_saves(channel: Channel) -> None:
        with db.write() as conn:
            channel_q.save_chain_state(conn, channel, utcnow())

    try:
        answers = [pay((one, 10), (two, 1)), pay((one, 20), (two, 2))]  # the first reads the rows, the next not
        indexer_saves(replace(a_channel(1, deposit=100), status=ChannelStatus.CLOSED))
        answers += [pay((one, 30), (two, 3)), pay((two, 4)), pay((one, 40)), pay((one, 50)), pay((two, 150))]
        indexer_saves(replace(a_channel(2, deposit=200)))
        answers += [pay((two, 150))]
    finally:
        writer.stop()
    assert answers == [
        ["new +10", "new +1"],
        ["new +10", "new +1"],
        ["channel_closed", "new +1"],  # written against the copies first: channel 1 had moved, rolled back
        ["new +1"],
        ["channel_closed"],  # channel 1 locked first: its copy had moved at its last group
        ["channel_closed"],  # against the copy again, refused, and the copy checked
        ["amount_exceeds_deposit"],
        ["new +146"],  # the copy (deposit 100) refused it; that answer was checked, found moved, judged again
    ]
    with db.read() as conn:
        paid = {cid: [p.increment for p in reversed(channel_q.list_payments(conn, cid).items)] for cid in (one, two)}
    assert paid == {one: [10, 10], two: [1, 1, 1, 1, 146]}
    if db.is_sqlite:
        assert _group_writes(writer) == {"held": 0, "ahead": 0, "locked": 8, "moved": 0}
    else:
        assert _group_writes(writer) == {"held": 4, "ahead": 0, "locked": 4, "moved": 2}


def test_a_cap_on_one_payee_leaves_the_writers_fast_paths_to_every_other_payees_groups(db: Database) -> None:
    """Anyone may set a spending cap on its own payee address (a signed-in account), and any cap took the PostgreSQL
    writer's in-memory judging and lock-free writes (`held`) from every group of every payee. Now only a group with a
    channel a cap covers is written under row locks, its windows locked after them; the cap holds exactly."""
    capped_payee = "0x" + "cc" * 20
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(1, deposit=100), utcnow())
        channel_q.insert_channel(conn, a_channel(2, payee=capped_payee, deposit=100), utcnow())
        cap = caps_q.set_cap(conn, capped_payee, ANY, ETH, 8, 3600, 0, Limits(10, 10, 10))
    assert isinstance(cap, Cap)
    one, two = a_channel(1).channel_id, a_channel(2).channel_id
    payer = bytes.fromhex("aa" * 20)
    writer = Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0)
    writer.rules = Rules(caps=(cap,))
    writer.start()

    def pay(channel_id: str, amount: int) -> str:
        (outcome,) = writer.submit([Voucher(ChannelId(channel_id), amount, bytes(65))], [payer]).result()
        return outcome.code if isinstance(outcome, SettlementError) else f"new +{outcome.receipt.increment}"

    try:
        answers = [pay(one, 10), pay(one, 20), pay(one, 30), pay(two, 5), pay(two, 8), pay(two, 9), pay(one, 40)]
    finally:
        writer.stop()
    assert answers == ["new +10", "new +10", "new +10", "new +5", "new +3", "spending_cap_reached", "new +10"]
    if db.is_sqlite:
        assert _group_writes(writer) == {"held": 0, "ahead": 0, "locked": 7, "moved": 0}
    else:  # old code: every group locked (7)
        assert _group_writes(writer) == {"held": 3, "ahead": 0, "locked": 4, "moved": 0}


class RowHolder:
    """Another process's writer mid-group: a transaction on its own connection that holds one channel's row lock
    until released."""

    def __init__(self, db: Database, channel_id: str) -> None:
        self._conn = db.engine.connect()
        self._tx = self._conn.begin()
        self._conn.execute(text("SELECT 1 FROM channels WHERE channel_id = :id FOR UPDATE"), {"id": channel_id})

    def release(self) -> None:
        if not self._conn.closed:
            self._tx.rollback()
            self._conn.close()


class WriterBlock:
    """Holds the writer back: on PostgreSQL another transaction's lock on one channel's row (`RowHolder`), on SQLite
    the database's write lock itself, until released."""

    def __init__(self, db: Database, channel_id: str) -> None:
        self._row = None if db.is_sqlite else RowHolder(db, channel_id)
        self._raw: Any = db.engine.raw_connection() if db.is_sqlite else None
        if self._raw is not None:
            self._raw.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self._row is not None:
            self._row.release()
        if self._raw is not None:
            self._raw.rollback()
            self._raw.close()
            self._raw = None


def _deferred(writer: Ingestor) -> float:
    return writer.metrics.registry.get_sample_value("settlement_ingest_deferred_vouchers_total") or 0.0


def test_a_group_answers_what_it_locked_while_another_process_holds_one_of_its_channels(db: Database) -> None:
    """Issue 20: groups of server processes that share channels queued behind each other's row locks (four writers
    sharing every channel: 4,500 vouchers/s against 52,000 apart). A group now commits the channels it can lock at
    once and answers their jobs; a channel another transaction holds is waited for in a later turn, holding nothing
    else meanwhile. Here a job on channel 1 is answered while channel 2, in the same group, is held; channel 2's two
    vouchers are judged after the holder lets go, in order."""
    if db.engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no row locks: one writer transaction holds the whole database at a time")
    with db.write() as conn:
        for n in (1, 2, 9):
            channel_q.insert_channel(conn, a_channel(n, deposit=100), utcnow())
    one, two, nine = (a_channel(n).channel_id for n in (1, 2, 9))
    payer = bytes.fromhex("aa" * 20)
    writer = Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0)
    writer.start()

    def answers(outcomes: list[Any]) -> list[str]:
        return [o.code if isinstance(o, SettlementError) else f"{'new' if o.new else 'again'} +{o.receipt.increment}"
                for o in outcomes]  # fmt: skip

    holds_nine = RowHolder(db, nine)
    holds_two: RowHolder | None = None
    try:
        first = writer.submit([Voucher(nine, 10, bytes(65))], [payer])
        wait_until(lambda: _deferred(writer) == 1)
        holds_two = RowHolder(db, two)
        paid_one = writer.submit([Voucher(one, 10, bytes(65))], [payer])  # these two jobs queue (one group, or
        paid_two = writer.submit([Voucher(two, 10, bytes(65)), Voucher(two, 30, bytes(65))], [payer, payer])  # two)
        holds_nine.release()
        assert answers(first.result(timeout=20)) == ["new +10"]
        assert answers(paid_one.result(timeout=20)) == ["new +10"]  # answered while channel 2 is still held
        assert not paid_two.done()
        with db.read() as conn:  # read without a lock: channel 2's row is still held
            assert [cast(Channel, channel_q.get_channel(conn, cid)).accepted for cid in (one, two, nine)] == [10, 0, 10]
        # The writer may take the jobs as two groups (half of what is queued, when groups can go ahead): channel 2's
        # is then tried after channel 1's answer, which a loaded machine let this thread pass before the release.
        wait_until(lambda: _deferred(writer) == 3)
        holds_two.release()
        assert answers(paid_two.result(timeout=20)) == ["new +10", "new +20"]
        assert _deferred(writer) == 3  # channel 9's voucher once, channel 2's two once
    finally:
        for holder in (holds_nine, holds_two):
            if holder is not None:
                holder.release()  # before the writer stops: it may be waiting for the row
        writer.stop()


def _stored_channels(db: Database, *numbers: int) -> list[ChannelId]:
    """`a_channel(n)` for each number, stored with a deposit of 100; their ids."""
    with db.write() as conn:
        for n in numbers:
            channel_q.insert_channel(conn, a_channel(n, deposit=100), utcnow())
    return [a_channel(n).channel_id for n in numbers]


def _started_writer(db: Database) -> Ingestor:
    """A writer given its vouchers' signers: no verifier, no indexer."""
    writer = Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0)
    writer.start()
    return writer


PAYER = bytes.fromhex("aa" * 20)  # the signer these tests give the writer for every voucher


@pytest.mark.postgres
def test_one_voucher_groups_are_not_planned_anew_each_time(fresh_postgres: str) -> None:
    """PostgreSQL keeps planning a prepared statement at every execution while its generic plan looks dearer than the
    custom plans of its first executions, which it does for good when those paid one voucher each: the writer's
    group statement asks for the generic plan. Counted on the writer's one connection (psycopg prepares a statement
    at its `prepare_threshold`-th execution; the executions before it are planned as they come)."""
    db = Database(fresh_postgres, pool_size=1)
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(1, deposit=100), utcnow())
    writer = _started_writer(db)
    try:
        for amount in range(1, 21):
            (outcome,) = writer.submit([Voucher(a_channel(1).channel_id, amount, bytes(65))], [PAYER]).result()
            assert isinstance(outcome, Verdict) and outcome.new
    finally:
        writer.stop()
    try:
        with db.read() as conn:
            threshold = conn.connection.driver_connection.prepare_threshold  # type: ignore[union-attr]
            plans = conn.execute(
                text(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                    " WHERE statement LIKE '%held AS MATERIALIZED%'"
                )
            ).all()
    finally:
        db.dispose()
    # the first group reads and locks its channel (the writer holds no copy yet); the 19 after it are written held
    assert [tuple(row) for row in plans] == [(19 - threshold, 0)]


def test_a_group_judged_while_the_one_before_it_is_written_is_judged_again_when_that_write_is_rolled_back(
    db: Database,
) -> None:
    """Issue 20, the writer's Python beside the database's work: on PostgreSQL the writer sends a group's statement
    and, while the database runs it, judges the next group against that group's outcome (`ahead`); each group is
    answered after its own commit. Here two jobs queue while the writer waits for a row another transaction holds:
    the first is judged against the writer's copy and sent, the second judged against the first and written after it.
    Then the indexer suspends the channel while two more queue: the first one's write finds the row moved and is
    rolled back, and the second, judged against the first's outcome (its row version too: the indexer's write raised
    the row to the very version the first write would have), is judged again on what is stored: both refused,
    nothing paid."""
    if db.engine.dialect.name == "sqlite":
        pytest.skip("SQLite's writer holds the whole database: a group is never judged while another is written")
    one, nine = _stored_channels(db, 1, 9)
    writer = _started_writer(db)

    def answer(outcomes: list[Any]) -> str:
        (outcome,) = outcomes
        return outcome.code if isinstance(outcome, SettlementError) else f"new +{outcome.receipt.increment}"

    def queued_behind_a_held_row(at: int, amounts: list[int], meanwhile: Callable[[], None]) -> list[str]:
        holder = RowHolder(db, nine)
        try:
            held_back = writer.submit([Voucher(nine, at, bytes(65))], [PAYER])
            wait_until(lambda: _deferred(writer) == at // 10)  # the writer waits for channel 9's row
            meanwhile()
            queued = [writer.submit([Voucher(one, amount, bytes(65))], [PAYER]) for amount in amounts]
        finally:
            holder.release()
        return [answer(future.result(timeout=20)) for future in (held_back, *queued)]

    def the_indexer_suspends_channel_one() -> None:
        with db.write() as conn:
            suspended = replace(a_channel(1, deposit=100), suspended_reason="a reorganisation deeper than expected")
            channel_q.save_chain_state(conn, suspended, utcnow())

    try:
        first = answer(writer.submit([Voucher(one, 10, bytes(65))], [PAYER]).result(timeout=20))
        landed = queued_behind_a_held_row(10, [20, 30], lambda: None)
        writes_then = _group_writes(writer)
        rolled_back = queued_behind_a_held_row(20, [40, 50], the_indexer_suspends_channel_one)
    finally:
        writer.stop()
    assert [first, landed, rolled_back] == [
        "new +10",
        ["new +10", "new +10", "new +10"],
        ["new +10", "channel_suspended", "channel_suspended"],
    ]
    with db.read() as conn:
        paid = {cid: [p.increment for p in reversed(channel_q.list_payments(conn, cid).items)] for cid in (one, nine)}
    assert paid == {one: [10, 10, 10], nine: [10, 10]}
    assert writes_then == {"held": 1, "ahead": 1, "locked": 3, "moved": 0}  # 30 was judged against 20's write
    assert _group_writes(writer) == {"held": 1, "ahead": 1, "locked": 7, "moved": 2}


def test_a_caller_gone_before_its_group_commits_never_stops_the_writer(db: Database) -> None:
    """A caller that stops waiting (an HTTP client gone: the event loop cancels the future it awaited) must not take
    the writer with it: its voucher is still committed (it was queued: a receipt may already be on its way), the
    group's other callers are answered, and the next groups too. Here the cancelled job is the first of two that
    queue while the writer waits for a held row, so on PostgreSQL it is written while the next is judged against
    it (`ahead`); on SQLite the two are one group."""
    one, nine = _stored_channels(db, 1, 9)
    writer = _started_writer(db)

    def pay(cid: ChannelId, amount: int) -> Any:
        return writer.submit([Voucher(cid, amount, bytes(65))], [PAYER])

    def increment(future: Any) -> int:
        (verdict,) = future.result(timeout=20)
        assert isinstance(verdict, Verdict) and verdict.new
        return verdict.receipt.increment

    try:
        assert increment(pay(one, 10)) == 10  # the writer holds channel 1 from now on
        assert increment(pay(nine, 10)) == 10
        holder = WriterBlock(db, nine)
        try:
            held_back = pay(nine, 20)
            if not db.is_sqlite:
                wait_until(lambda: _deferred(writer) == 1)  # the writer waits for channel 9's row
            gone, waiting = pay(one, 20), pay(one, 30)
            assert gone.cancel()  # nothing could be answered meanwhile: the writer is held back
        finally:
            holder.release()
        assert [increment(held_back), increment(waiting), increment(pay(one, 40))] == [10, 10, 10]
    finally:
        writer.stop()
    with db.read() as conn:
        assert [p.increment for p in reversed(channel_q.list_payments(conn, one).items)] == [10, 10, 10, 10]


def _the_indexers_close(conn: Any, channel_id: str) -> None:
    channel_q.save_chain_state(conn, replace(a_channel(1, deposit=100), status=ChannelStatus.CLOSED), utcnow())


def _another_writers_payment_of_30(conn: Any, channel_id: str) -> None:
    conn.execute(text("SELECT 1 FROM channels WHERE channel_id = :id FOR UPDATE"), {"id": channel_id})
    channel_q.record_payments(conn, [(Receipt(ChannelId(channel_id), 30, 20, 70, utcnow()), b"\x02" * 65)])


@pytest.mark.parametrize(
    ("meanwhile", "answers", "increments", "latest"),
    [
        (_the_indexers_close, ["channel_closed", "channel_closed"], [10], (10, ChannelStatus.CLOSED)),
        (_another_writers_payment_of_30, ["stale_voucher", "new +10"], [10, 20, 10], (40, ChannelStatus.OPEN)),
    ],
)
def test_a_voucher_deferred_behind_another_transaction_is_judged_against_what_it_committed(
    db: Database, meanwhile: Callable[[Any, str], None], answers: list[str], increments: list[int], latest: Any
) -> None:
    """The store moves while a voucher waits for its channel: another transaction holds the channel's row when the
    writer's group comes, the indexer's recording the channel's close, or another process's writer's accepting 30.
    The group defers the channel, waits for that commit, and judges the voucher (20) against what it then reads, not
    against its own copy (from its accepted voucher of 10) nor what its waiting statement's snapshot held: refused as
    closed, or as stale (taken, it would have counted 10 of the payer's money twice); a later 40 likewise (refused,
    or +10). (Tried while moving SQLite's latest voucher off the channel row: a latest voucher read from the payments
    in the statement that waited, rather than from the row it locked, took 20.)"""
    if db.engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no row locks: one writer transaction holds the whole database at a time")
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(1, deposit=100), utcnow())
    cid, payer = a_channel(1).channel_id, bytes.fromhex("aa" * 20)
    writer = Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0)
    writer.start()
    other = db.engine.connect()

    def answer(outcome: Any) -> str:
        return outcome.code if isinstance(outcome, SettlementError) else f"new +{outcome.receipt.increment}"

    try:
        (accepted,) = writer.submit([Voucher(cid, 10, bytes(65))], [payer]).result(timeout=20)
        assert isinstance(accepted, Verdict) and accepted.new
        elsewhere = other.begin()
        meanwhile(other, cid)
        late = writer.submit([Voucher(cid, 20, bytes(65))], [payer])
        wait_until(lambda: _deferred(writer) == 1)
        assert not late.done()
        elsewhere.commit()
        (refused,) = late.result(timeout=20)
        (then,) = writer.submit([Voucher(cid, 40, bytes(65))], [payer]).result(timeout=20)
        assert [answer(refused), answer(then)] == answers
    finally:
        other.close()
        writer.stop()
    with db.read() as conn:
        stored = cast(Channel, channel_q.get_channel(conn, cid))
        paid = [p.increment for p in reversed(channel_q.list_payments(conn, cid).items)]
    assert (stored.accepted, stored.status) == latest
    assert paid == increments


def test_writers_sharing_every_channel_pay_each_voucher_once(db: Database) -> None:
    """Four writers (four server processes on one store) take vouchers of the same eight channels at once, each from
    its own sequence (writer w signs k * 4 + w + 1: a payer's pipelined vouchers spread over processes by a
    round-robin balancer, so some arrive below the channel's position and are refused as stale). On PostgreSQL the
    first turns find channel 0 held, so every writer defers it at least once. Whatever the interleaving, each
    channel's acknowledged increments add up to its stored position, its stored payments are exactly the
    acknowledged ones, and the highest voucher (100) is always accepted."""
    channels = [a_channel(n, deposit=1_000) for n in range(8)]
    with db.write() as conn:
        for channel in channels:
            channel_q.insert_channel(conn, channel, utcnow())
    ids = [c.channel_id for c in channels]
    payer = bytes.fromhex("aa" * 20)
    writers = [Ingestor(db, cast(Any, None), cast(Any, None), Metrics(), close_guard=0) for _ in range(4)]
    holder = RowHolder(db, ids[0]) if db.engine.dialect.name != "sqlite" else None
    outcomes: list[list[Any]] = [[] for _ in writers]

    def run(w: int) -> None:
        futures = [
            writers[w].submit([Voucher(cid, k * 4 + w + 1, bytes(65)) for cid in ids], [payer] * len(ids))
            for k in range(25)
        ]
        for future in futures:
            outcomes[w] += future.result(timeout=60)

    for writer in writers:
        writer.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            runs = [pool.submit(run, w) for w in range(4)]
            if holder is not None:
                wait_until(lambda: all(_deferred(w) >= 1 for w in writers))
                holder.release()
            for done in runs:
                done.result()
    finally:
        if holder is not None:
            holder.release()
        for writer in writers:
            writer.stop()
    new: dict[str, list[int]] = {cid: [] for cid in ids}
    for answer in (o for per_writer in outcomes for o in per_writer):
        if isinstance(answer, Verdict):
            assert answer.new
            new[answer.receipt.channel_id].append(answer.receipt.cumulative)
        else:
            assert isinstance(answer, StaleVoucherError)
    with db.read() as conn:
        stored = {cid: sorted(p.cumulative for p in channel_q.list_payments(conn, cid).items) for cid in ids}
        positions = {cid: cast(Channel, channel_q.get_channel(conn, cid)).accepted for cid in ids}
    assert {cid: sorted(values) for cid, values in new.items()} == stored
    assert positions == dict.fromkeys(ids, 100)
    assert all(values[-1] == 100 for values in stored.values())
    deferred = sum(_deferred(w) for w in writers)
    assert deferred >= 4 if holder is not None else deferred == 0


def test_the_service_writer_holds_as_many_channels_as_configured(make_service: Callable[..., Service]) -> None:
    assert make_service(held_channels=7).ingestor.held_max == 7  # SETTLEMENT_HELD_CHANNELS reaches the writer


def test_a_receipt_look_up_goes_straight_to_its_payment_whatever_the_channel_has_behind_it(db: Database) -> None:
    """The duplicate and idempotency-key look-ups the writer makes for a group probe the payments' unique indexes
    on both columns. They once walked every payment of the channel (a re-sent old voucher on a channel with 200,000
    payments held the SQLite writer, which serves every payer, for 21 ms; a keyed payment for 35 ms)."""
    history, now = 3_000, utcnow()
    a, b = a_channel(1), a_channel(2)
    with db.write() as conn:
        for channel in (a, b):
            channel_q.insert_channel(conn, channel, now)
        for channel in (a, b):
            channel_q.record_payments(
                conn,
                [
                    (Receipt(channel.channel_id, n, 1, MAX - n, now, idempotency_key=f"k{n}"), b"\x01" * 65)
                    for n in range(1, history + 1)
                ],
            )
        channel_q.record_payments(conn, [(Receipt(b.channel_id, MAX, MAX - history, 0, now), b"\x02" * 65)])
        conn.exec_driver_sql("ANALYZE")
    by_key = [(a.channel_id, "k7"), (b.channel_id, "k2999"), (a.channel_id, "k0"), (ChannelId("0x" + "ff" * 32), "k7")]
    by_amount = [(a.channel_id, 7), (b.channel_id, MAX), (a.channel_id, MAX), (b.channel_id, history + 1)]
    with db.read() as conn:
        driver: Any = conn.connection.driver_connection
        statements: list[str] = []
        if db.is_sqlite:
            driver.set_trace_callback(statements.append)
        else:
            read_before = _index_entries_read(conn)
        keyed = channel_q.receipts_by_key(conn, by_key)
        priors = channel_q.receipts_for(conn, by_amount)
        if db.is_sqlite:
            driver.set_trace_callback(None)
            plans = [" ".join(str(row[3]) for row in driver.execute("EXPLAIN QUERY PLAN " + s)) for s in statements]
        else:
            read = _index_entries_read(conn) - read_before
    assert [(k, r.cumulative, r.increment, r.remaining) for k, r in keyed.items()] == [
        ((a.channel_id, "k7"), 7, 1, MAX - 7),
        ((b.channel_id, "k2999"), 2999, 1, MAX - 2999),
    ]
    assert [(k, r.idempotency_key, r.increment) for k, r in priors.items()] == [
        ((a.channel_id, 7), "k7", 1),
        ((b.channel_id, MAX), None, MAX - history),
    ]
    if db.is_sqlite:
        assert len(plans) == 2
        assert (
            "SEARCH p USING INDEX uq_payments_channel_no_idempotency_key (channel_no=? AND idempotency_key=?)"
            in plans[0]
        )
        assert "(channel_no=? AND cumulative=?)" in plans[1]
    else:  # the payments' index entries each look-up read: one per payment found, not the channel's thousands
        assert read == 4


def _index_entries_read(conn: Any) -> int:
    """Index entries of the payments table this transaction has read so far (PostgreSQL's own counters)."""
    return int(
        conn.exec_driver_sql(
            "SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(indexrelid)), 0) FROM pg_index"
            " WHERE indrelid = 'payments'::regclass"
        ).scalar()
    )


def test_the_latest_batches_come_with_their_own_entry_counts(db: Database) -> None:
    """What `settlement status` and `settlement batches` show: each of the latest batches with how many channels it
    carried, counted for those batches only."""
    start = utcnow()
    with db.write() as conn:
        for n in (1, 2, 3):
            channel_q.insert_channel(conn, a_channel(n), start)
        for k, channels in enumerate(((1, 2), (1, 2, 3), (3,))):
            entries = [batch_q.Entry(a_channel(n).channel_id, 10 * k + n, b"\x01" * 65) for n in channels]
            batch_q.create_batch(conn, f"b{k}", "0x" + "cc" * 20, k, entries, start + timedelta(seconds=k))
    with db.read() as conn:
        latest = [(batch.batch_id, n) for batch, n in batch_q.recent_batches(conn, 2)]
        every = [(batch.batch_id, n) for batch, n in batch_q.recent_batches(conn)]
    assert latest == [("b2", 1), ("b1", 3)]
    assert every == [("b2", 1), ("b1", 3), ("b0", 2)]


def test_racing_retries_of_one_keyed_payment_pay_it_once(
    make_service: Callable[..., Service],
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    """16 submissions of one payment (key "pay-1", 100 wei) race each other: half signed from position 0, half from
    the re-read position 100, as clients that lost their answers would. Exactly one payment is stored; every other
    answer is that payment's receipt, or a refusal of the key for another amount, never a second charge."""
    service = make_service()
    channel = open_channel(accounts[5], accounts[6].address, amount=1_000)
    service.indexer.catch_up()
    cid = channel.hex_id
    vouchers = [
        Voucher(cid, amount, sign(channel.payer, channel.id, amount), idempotency_key="pay-1")
        for amount in [100, 200] * 8
    ]
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda v: service.ingestor.ingest([v])[0], vouchers))
    new = [o.receipt for o in outcomes if isinstance(o, Verdict) and o.new]
    assert len(new) == 1
    first = new[0]
    others = [o for o in outcomes if not (isinstance(o, Verdict) and o.new)]
    assert all(
        (isinstance(o, Verdict) and o.receipt == first)
        or (isinstance(o, SettlementError) and o.code == "idempotency_key_reused")
        for o in others
    )
    with service.db.read() as conn:
        stored = channel_q.list_payments(conn, cid).items
        accepted = channel_q.get_channel(conn, cid)
    assert stored == [first]
    assert accepted is not None and accepted.accepted == first.cumulative


def test_the_channel_numbers_and_compact_amounts_migrations_keep_every_payment(empty_store_url: str) -> None:
    """Revision 0013 makes payments carry their channel's number instead of its id, 0014 SQLite's amounts integers
    or blobs instead of text: payments stored before them keep their channel, ids, order, idempotency keys and exact
    amounts (2^256 - 1 included), and payments after them continue the same id sequence."""
    from settlement.store.payee_events import payments_after

    db = store_at_revision(empty_store_url, "0012")
    try:
        money = (lambda v: f"{v:078d}") if db.is_sqlite else (lambda v: v)
        a, b = a_channel(1), a_channel(2)
        with db.write() as conn:
            for channel, accepted in ((b, 20), (a, 3)):  # b first: numbered before a
                conn.execute(
                    text(
                        "INSERT INTO channels (channel_id, payer, payee, token, salt, deposit, settled, status,"
                        " as_of_block, accepted, signature, updated_at_us) VALUES (:c, :payer, :payee, :t, :s, :d,"
                        " :zero, 1, 1, :acc, :sig, 0)"
                    ),
                    {
                        "c": channel.channel_id,
                        "payer": channel.payer,
                        "payee": channel.payee,
                        "t": ETH,
                        "s": channel.salt,
                        "d": money(MAX if channel is b else 100),
                        "zero": money(0),
                        "acc": money(accepted),
                        "sig": b"\x01" * 65,
                    },
                )
            for channel, cumulative, key in ((a, 1, None), (b, 10, None), (a, 2, "k"), (b, 20, None), (a, 3, None)):
                conn.execute(
                    text(
                        "INSERT INTO payments (channel_id, cumulative, increment, remaining, signature, reference,"
                        " accepted_at_us, idempotency_key) VALUES (:c, :cum, :inc, :rem, :sig, :ref, 7, :key)"
                    ),
                    {
                        "c": channel.channel_id,
                        "cum": money(cumulative),
                        "inc": money(1 if channel is a else 10),
                        "rem": money(100 - cumulative),
                        "sig": bytes([cumulative]) * 65,
                        "ref": f"r{cumulative}",
                        "key": key,
                    },
                )
        db.migrate()
        with db.write() as conn:
            before = [
                (r.channel_id, r.cumulative, r.reference) for r in channel_q.list_payments(conn, a.channel_id).items
            ]
            keyed = channel_q.receipts_by_key(conn, [(a.channel_id, "k")])
            feed = [(p.payment_id, p.channel_id, p.cumulative) for p in payments_after(conn, a.payee, 0, 100)]
            channel_q.insert_channel(conn, a_channel(3), utcnow())
            channel_q.record_payments(conn, [(Receipt(a_channel(3).channel_id, 5, 5, 95, utcnow()), b"\x02" * 65)])
            channel_q.record_payments(conn, [(Receipt(b.channel_id, 30, 10, 70, utcnow()), b"\x03" * 65)])
            after = [(p.payment_id, p.channel_id, p.cumulative) for p in payments_after(conn, a.payee, 5, 100)]
            numbers = conn.execute(text("SELECT channel_no FROM channels ORDER BY channel_no")).scalars().all()
            wide = channel_q.get_channel(conn, b.channel_id)
        assert before == [(a.channel_id, 3, "r3"), (a.channel_id, 2, "r2"), (a.channel_id, 1, "r1")]
        assert [(r.cumulative, r.increment, r.remaining) for r in keyed.values()] == [(2, 1, 98)]
        assert feed == [
            (1, a.channel_id, 1),
            (2, b.channel_id, 10),
            (3, a.channel_id, 2),
            (4, b.channel_id, 20),
            (5, a.channel_id, 3),
        ]
        assert after == [(6, a_channel(3).channel_id, 5), (7, b.channel_id, 30)]
        assert len(numbers) == len(set(numbers)) == 3
        assert wide is not None and (wide.deposit, wide.accepted) == (MAX, 30)
    finally:
        db.dispose()


def test_the_channel_numbers_and_compact_amounts_migrations_go_back_and_forth_without_losing_a_payment(
    db: Database,
) -> None:
    """Downgrading 0014 and 0013 gives payments their channel ids and SQLite its 78-digit text again; upgrading once
    more gives back the same payments, amounts up to 2^256 - 1 included."""
    now = utcnow()
    big = a_channel(2)
    with db.write() as conn:
        channel_q.insert_channel(conn, a_channel(1, deposit=100), now)
        channel_q.insert_channel(conn, big, now)
        channel_q.record_payments(
            conn, [(Receipt(a_channel(1).channel_id, 5, 5, 95, now, idempotency_key="k"), b"\x01" * 65)]
        )
        channel_q.record_payments(conn, [(Receipt(big.channel_id, MAX, MAX, 0, now), b"\x02" * 65)])
    with db.read() as conn:
        before = [channel_q.list_payments(conn, c.channel_id).items for c in (a_channel(1), big)]
    db.downgrade("0012")
    with db.read() as conn:
        rows = conn.execute(text("SELECT channel_id, cumulative FROM payments ORDER BY id")).all()
    stored = (lambda v: f"{v:078d}") if db.is_sqlite else (lambda v: v)
    assert [(c, int(v) if not db.is_sqlite else v) for c, v in rows] == [
        (a_channel(1).channel_id, stored(5)),
        (big.channel_id, stored(MAX)),
    ]
    db.migrate()
    with db.read() as conn:
        after = [channel_q.list_payments(conn, c.channel_id).items for c in (a_channel(1), big)]
        keyed = channel_q.receipts_by_key(conn, [(a_channel(1).channel_id, "k")])
    assert after == before
    assert list(keyed.values()) == before[0]


def test_the_withdrawals_migration_names_the_account_of_earlier_withdrawals(empty_store_url: str) -> None:
    """Revision 0007 gives Withdrawn events an indexed account column; those indexed before it get theirs too."""
    from settlement.store.chainlog import withdrawn_by

    db = store_at_revision(empty_store_url, "0006")
    try:
        account, token = "0x" + "ab" * 20, "0x" + "00" * 20
        with db.write() as conn:
            for log_index, (event, args) in enumerate(
                [
                    ("Withdrawn", {"account": account, "token": token, "to": account, "amount": 7}),
                    ("Withdrawn", {"account": account, "token": token, "to": account, "amount": 5}),
                    ("ChannelOpened", {"payer": account}),
                ]
            ):
                conn.execute(
                    text(
                        "INSERT INTO chain_events (block_number, log_index, block_hash, tx_hash, event, channel_id, "
                        "args) VALUES (9, :i, :h, :h, :e, NULL, :a)"
                    ),
                    {"i": log_index, "h": "0x" + "11" * 32, "e": event, "a": json.dumps(args)},
                )
        db.migrate()
        with db.read() as conn:
            assert withdrawn_by(conn, account) == {token: 12}
            accounts = conn.execute(text("SELECT account FROM chain_events ORDER BY log_index")).scalars().all()
        assert accounts == [account, account, None]
    finally:
        db.dispose()
