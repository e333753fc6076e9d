"""The indexer against the real hub: every event, restarts, on-demand lookups, and reorgs above and below the
confirmation depth (evm_snapshot / evm_revert)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement.chain.deployment import Deployment
from settlement.chain.node import connect
from settlement.devtools.devnet import Devnet
from settlement.domain.model import Channel, ChannelStatus, Voucher
from settlement.eip712.vouchers import VoucherVerifier, read_domain
from settlement.errors import ChainUnavailableError, ChannelSuspendedError
from settlement.indexer.follower import SPAN_REGROWTH, Indexer, Progress
from settlement.ingest.pipeline import Ingestor
from settlement.server.metrics import Metrics
from settlement.store import Database
from settlement.store import channels as channel_q
from settlement.store.tables import chain_events
from tests.hub_helpers import Channel as HubChannel
from tests.hub_helpers import LaggingRpc, RangeCappedRpc, batch, body, send, settle_call
from tests.proxy import TcpProxy


def stored(db: Database, channel: HubChannel) -> Channel:
    with db.read() as conn:
        found = channel_q.get_channel(conn, channel.hex_id)
    assert found is not None
    return found


def event_count(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(chain_events)).scalar_one())


def mine(w3: Web3, blocks: int) -> None:
    for _ in range(blocks):
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])


def test_applies_every_channel_event(
    make_indexer: Callable[..., Indexer],
    db: Database,
    w3: Web3,
    hub: Contract,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    indexer = make_indexer()
    payer, payee = accounts[5], accounts[6].address
    channel = open_channel(payer, payee, amount=1_000)
    indexer.catch_up()
    first = stored(db, channel)
    stored_parties = (str(first.payer), str(first.payee))
    assert (*stored_parties, first.deposit, first.status) == (payer.address, payee, 1_000, ChannelStatus.OPEN)
    assert first.salt == "0x" + channel.salt.hex()

    send(w3, hub.functions.topUp(channel.id, 500), payer.address, value=500)
    send(
        w3,
        settle_call(hub, batch(payee, channel.token, channel.voucher(300, sign(payer, channel.id, 300)))),
        accounts[0].address,
    )
    receipt = send(w3, hub.functions.requestClose(channel.id), payer.address)
    deadline = w3.eth.get_block(receipt["blockNumber"])["timestamp"] + 3600
    indexer.catch_up()
    state = stored(db, channel)
    assert (state.deposit, state.settled, state.status, state.close_deadline) == (
        1_500,
        300,
        ChannelStatus.CLOSING,
        deadline,
    )
    send(w3, hub.functions.closeByPayee(channel.id, 0, b""), payee)
    indexer.catch_up()
    assert stored(db, channel).status == ChannelStatus.CLOSED
    assert indexer.progress is not None and indexer.progress.lag == 0


def test_resumes_after_restart_without_missing_or_repeating(
    make_indexer: Callable[..., Indexer],
    db: Database,
    w3: Web3,
    hub: Contract,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
) -> None:
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    make_indexer().catch_up()
    events_before = event_count(db)
    send(w3, hub.functions.topUp(channel.id, 50), accounts[5].address, value=50)
    send(w3, hub.functions.topUp(channel.id, 25), accounts[5].address, value=25)
    restarted = make_indexer()  # a new process: only the store remembers
    restarted.catch_up()
    restarted.catch_up()
    assert stored(db, channel).deposit == 175
    assert event_count(db) == events_before + 2


def test_catch_up_waits_for_every_block_even_when_another_indexer_applies_a_range_first(
    make_indexer: Callable[..., Indexer],
    db: Database,
    w3: Web3,
    hub: Contract,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the scale bench: catch_up stopped at the first poll that lost its range to the service's own
    indexer thread, while later blocks were still unapplied."""
    first = make_indexer()
    first.catch_up()
    channels = [open_channel(accounts[5], accounts[6].address, amount=100 + n) for n in range(3)]  # 3 blocks
    mine(w3, 1)  # with no logs, after the channels: the full range is longer than one poll
    slow, rival = make_indexer(), make_indexer()
    slow.batch_blocks = rival.batch_blocks = 1
    real_apply = slow._apply
    lost: list[bool] = []

    def rival_first(*args: object) -> bool:
        if not lost:
            rival.poll()  # the other indexer applies this range meanwhile
        applied = real_apply(*args)  # type: ignore[arg-type]
        lost.append(not applied)
        return applied

    monkeypatch.setattr(slow, "_apply", rival_first)
    slow.catch_up()
    assert lost[0] is True
    assert slow.progress is not None
    assert slow.progress.cursor == slow.progress.confirmed
    assert [stored(db, c).deposit for c in channels] == [100, 101, 102]


def test_a_lookup_before_the_indexer_gets_there_is_not_applied_twice(
    make_indexer: Callable[..., Indexer],
    db: Database,
    w3: Web3,
    hub: Contract,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
) -> None:
    indexer = make_indexer()
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    send(w3, hub.functions.topUp(channel.id, 50), accounts[5].address, value=50)
    found = indexer.lookup(channel.hex_id)
    assert found is not None and found.deposit == 150
    send(w3, hub.functions.topUp(channel.id, 1), accounts[5].address, value=1)
    indexer.catch_up()  # replays ChannelOpened and the first top-up (already reflected) and the second (new)
    assert stored(db, channel).deposit == 151


@pytest.mark.faults
def test_deposits_count_only_once_confirmed_and_a_shallow_reorg_is_absorbed(
    make_indexer: Callable[..., Indexer],
    db: Database,
    w3: Web3,
    hub: Contract,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
) -> None:
    indexer = make_indexer(confirmations=3)
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    mine(w3, 3)
    indexer.catch_up()
    assert stored(db, channel).deposit == 100
    snapshot = w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    send(w3, hub.functions.topUp(channel.id, 900), accounts[5].address, value=900)
    mine(w3, 1)
    indexer.catch_up()
    assert stored(db, channel).deposit == 100  # two blocks deep: not confirmed yet
    w3.provider.make_request(RPCEndpoint("evm_revert"), [snapshot])  # the top-up is reorged out
    mine(w3, 6)
    indexer.catch_up()
    state = stored(db, channel)
    assert (state.deposit, state.suspended_reason) == (100, None)


@pytest.mark.faults
def test_a_reorg_deeper_than_the_confirmations_suspends_the_channels_it_touched(
    make_indexer: Callable[..., Indexer],
    db: Database,
    w3: Web3,
    hub: Contract,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    indexer = make_indexer(confirmations=1)
    untouched = open_channel(accounts[7], accounts[6].address, amount=100)
    mine(w3, 2)
    indexer.catch_up()
    snapshot = w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    mine(w3, 3)
    indexer.catch_up()
    assert stored(db, channel).deposit == 100
    w3.provider.make_request(RPCEndpoint("evm_revert"), [snapshot])
    mine(w3, 6)
    with caplog.at_level(logging.CRITICAL, logger="settlement.indexer.follower"):
        indexer.catch_up()
    assert "reorganisation deeper than 1 confirmations" in caplog.text
    state = stored(db, channel)
    assert state.suspended_reason is not None and state.deposit == 0
    assert stored(db, untouched).suspended_reason is None

    domain = read_domain(hub)
    ingestor = Ingestor(db, VoucherVerifier(domain), indexer, Metrics(), close_guard=0)
    ingestor.start()
    try:
        outcome = ingestor.ingest([Voucher(channel.hex_id, 5, sign(accounts[5], channel.id, 5))])[0]
        ok = ingestor.ingest([Voucher(untouched.hex_id, 5, sign(accounts[7], untouched.id, 5))])[0]
    finally:
        ingestor.stop()
    assert isinstance(outcome, ChannelSuspendedError)
    assert not isinstance(ok, Exception)


def test_a_node_behind_the_indexer_is_waited_for_not_taken_for_a_reorg(
    db: Database,
    w3: Web3,
    hub: Contract,
    make_indexer: Callable[..., Indexer],
    failover_behind: Callable[[int], tuple[TcpProxy, Web3]],
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The primary RPC fails over to a fallback a few blocks behind it (or a provider's balancer sends a read to a node
    behind the others): the block at the indexer's cursor is not there yet. It was taken for a reorganisation deeper
    than the confirmations: every channel touched since the last block that node had was suspended (409
    `channel_suspended` to its payer, its deposit read as 0) until an operator resumed it. Now the indexer waits for
    the node, says so once, and goes on where it was when a node that has the blocks answers again."""
    fork_block = w3.eth.block_number
    channel = open_channel(accounts[5], accounts[6].address, amount=100)  # in a block the node behind lacks
    mine(w3, 3)
    primary, chain = failover_behind(fork_block)
    indexer = make_indexer(confirmations=1, chain=chain)
    indexer.catch_up()
    applied = fork_block + 3
    assert (stored(db, channel).deposit, indexer.progress) == (100, Progress(applied + 1, applied, applied))
    primary.cut()  # the fallback answers now
    with caplog.at_level(logging.WARNING, logger="settlement.indexer.follower"):
        assert [indexer.poll() for _ in range(3)] == [0, 0, 0]
    assert [r.getMessage() for r in caplog.records if r.name == "settlement.indexer.follower"] == [
        f"the chain's node is at block {fork_block}, behind block {applied} the indexer applied: waiting for it"
    ]
    state = stored(db, channel)  # the code before: suspended, its deposit 0
    assert (state.suspended_reason, state.deposit, state.status) == (None, 100, ChannelStatus.OPEN)
    primary.mend()
    send(w3, hub.functions.topUp(channel.id, 50), accounts[5].address, value=50)
    mine(w3, 1)
    time.sleep(0.5)  # the primary is tried again after `primary_retry`
    indexer.catch_up()
    assert (stored(db, channel).deposit, stored(db, channel).suspended_reason) == (150, None)


def test_a_resume_through_a_node_behind_the_indexer_is_refused_not_applied(
    db: Database,
    w3: Web3,
    hub: Contract,
    make_indexer: Callable[..., Indexer],
    failover_behind: Callable[[int], tuple[TcpProxy, Web3]],
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
) -> None:
    """An operator's `resume` re-reads the channel's confirmed state and saves it. Through a node behind the indexer
    it read an older state than the one applied and saved it: a close requested since was read back as open (no
    watch on its deadline, vouchers taken to its end), and the events already applied were not applied again. Now it
    is refused until the node has caught up."""
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    mine(w3, 2)
    fork_block = w3.eth.block_number  # the channel is open and confirmed there
    send(w3, hub.functions.requestClose(channel.id), accounts[5].address)
    mine(w3, 2)
    primary, chain = failover_behind(fork_block)
    indexer = make_indexer(confirmations=1, chain=chain)
    indexer.catch_up()
    assert stored(db, channel).status == ChannelStatus.CLOSING
    primary.cut()
    with pytest.raises(ChainUnavailableError) as refused:
        indexer.resume(channel.hex_id)
    assert str(refused.value) == (
        f"the chain's node is at block {fork_block} (confirmed {fork_block - 1}), behind block {fork_block + 2} the "
        "indexer applied: resume once it has caught up"
    )
    assert stored(db, channel).status == ChannelStatus.CLOSING  # the code before: open again
    primary.mend()
    time.sleep(0.5)  # the primary is tried again after `primary_retry`
    assert indexer.resume(channel.hex_id).status == ChannelStatus.CLOSING


def test_a_log_range_the_rpc_refuses_is_read_in_narrower_ranges(
    db: Database,
    w3: Web3,
    hub_deployment: Deployment,
    make_indexer: Callable[..., Indexer],
    devnet: Devnet,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Providers cap `eth_getLogs` (by blocks, by results: a busy hub's 2,000 blocks hold more than 10,000 logs). The
    indexer asked for the refused range again at every poll, for good: no event after it was applied (a close
    request unseen, its deadline unwatched). Now a refused range is read in halves, the narrower span is kept, and
    every event is applied."""
    first = open_channel(accounts[5], accounts[6].address, amount=100)
    mine(w3, 40)
    last = open_channel(accounts[7], accounts[6].address, amount=200)
    with RangeCappedRpc(devnet.url, max_blocks=16) as capped:
        indexer = make_indexer(confirmations=0, chain=connect(capped.url))
        with caplog.at_level(logging.WARNING, logger="settlement.indexer.follower"):
            indexer.catch_up()
        assert (stored(db, first).deposit, stored(db, last).deposit) == (100, 200)  # the code before: ChainError
        ranges, head = list(capped.ranges), w3.eth.block_number
        # After SPAN_REGROWTH (64) reads taken in a row the span is tried twice as wide: refused here, halved again.
        capped.ranges.clear()
        w3.provider.make_request(RPCEndpoint("anvil_mine"), [hex(1_000)])
        later = open_channel(accounts[8], accounts[6].address, amount=300)
        indexer.catch_up()
        assert stored(db, later).deposit == 300
        widened = [b - a + 1 for a, b in capped.ranges]
    capped.ranges = ranges
    start = hub_deployment.block_number
    assert head - start + 1 > 32  # the first poll's range, refused, then halved at least twice
    refused, size = [], head - start + 1  # each refused range halved, from the first block, until one is taken
    while size > 16:
        refused.append((start, start + size - 1))
        size //= 2
    assert capped.ranges == refused + [(n, min(n + size - 1, head)) for n in range(start, head + 1, size)]
    assert indexer.span == size
    taken_before = len(capped.ranges) - len(refused)
    assert widened[: SPAN_REGROWTH - taken_before + 1] == [size] * (SPAN_REGROWTH - taken_before) + [2 * size]
    assert set(widened[:-1]) == {size, 2 * size}  # `size` taken, twice that refused (the last: up to the head)
    warned = [r.getMessage() for r in caplog.records if r.name == "settlement.indexer.follower"]
    assert warned[0] == (
        f"indexer: reading hub logs {start}..{head}: the chain's RPC refused ({{'code': -32005, 'message': 'query "
        f"exceeds max block range 16'}}); reading {(head - start + 1) // 2} blocks at a time"
    )
    assert len(warned) == len(refused) + widened.count(2 * size)


def test_logs_a_node_behind_left_out_of_a_range_are_read_before_the_range_is_taken(
    db: Database,
    w3: Web3,
    hub: Contract,
    make_indexer: Callable[..., Indexer],
    devnet: Devnet,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    caplog: pytest.LogCaptureFixture,
    mining: str,
) -> None:
    """A provider's balancer sends the indexer's `eth_getLogs` to a node behind the others. Geth (and providers after
    it) answers a range past its head with the logs of the blocks it has, and nothing, no error, for the rest: the
    indexer took the range as read, and a payer's close request in those blocks was never applied (the channel open
    in the store: vouchers accepted past the close guard, its deadline unwatched, the payer's refund taken with them
    unpaid). Now each block within `verify_blocks` of the head is checked against its header's bloom filter: one
    that may hold the hub's logs and had none in the answer is read by its hash, which a node without it refuses,
    and the range is applied once every such block is read."""
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    mine(w3, 1)  # the open confirmed
    with LaggingRpc(devnet.url, frozenset({"eth_getLogs"})) as balancer:
        indexer = make_indexer(confirmations=1, chain=connect(balancer.url))
        indexer.catch_up()
        assert stored(db, channel).status == ChannelStatus.OPEN
        balancer.at = w3.eth.block_number  # the logs now come from a node that stays at this block
        closed = send(w3, hub.functions.requestClose(channel.id), accounts[5].address)
        mine(w3, 3)
        with caplog.at_level(logging.WARNING, logger="settlement.indexer.follower"):
            assert indexer.poll() == 0  # the code before: the range applied, the close request left out of it
            assert indexer.poll() == 0
        assert stored(db, channel).status == ChannelStatus.OPEN
        assert balancer.unknown == 2  # the close request's block asked by its hash, refused, at each poll
        balancer.at = None  # the node caught up
        indexer.catch_up()
    assert stored(db, channel).status == ChannelStatus.CLOSING
    assert stored(db, channel).as_of_block >= closed["blockNumber"]
    warned = [r.getMessage() for r in caplog.records if r.name == "settlement.indexer.follower"]
    assert warned == [
        f"the chain's node left block {closed['blockNumber']} out of the hub's logs (it is behind the others): "
        "waiting for it"
    ]


def test_a_fresh_channel_whose_opening_the_rpcs_logs_do_not_hold_yet_is_a_retryable_503(
    api: Callable[..., TestClient],
    w3: Web3,
    devnet: Devnet,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    sign: Callable[..., bytes],
) -> None:
    """A voucher for a channel the indexer has not reached is looked up: its state at the confirmed block, its salt in
    its ChannelOpened log. A provider's balancer may send the log search to a node behind the one that answered the
    state: no log. That was 502 `chain_error` ("exists … but no ChannelOpened log"), an answer a payer takes for the
    service's fault; it is the chain's RPC not caught up, 503 `chain_unavailable` with Retry-After, paid once it is."""
    with LaggingRpc(devnet.url, frozenset({"eth_getLogs"})) as balancer:
        balancer.at = w3.eth.block_number  # the logs come from a node at the block before the opening
        client = api(rpc_url=balancer.url, indexer_interval=60)
        channel = open_channel(accounts[5], accounts[6].address, amount=100)
        opened = w3.eth.block_number
        voucher = body(channel, 1, sign(accounts[5], channel.id, 1))
        answer = client.post("/v1/vouchers", json=voucher)
        assert (answer.status_code, answer.json()["code"], answer.headers.get("Retry-After")) == (
            503,
            "chain_unavailable",
            "1",
        )
        assert answer.json()["message"] == (
            f"channel 0x{channel.id.hex()} is on chain at block {opened}, but the chain's RPC has no ChannelOpened "
            f"log for it in blocks {opened}..{opened} yet (its logs behind its state: a provider's balancer); retry "
            "in a second"
        )
        balancer.at = None  # the node caught up
        paid = client.post("/v1/vouchers", json=voucher)
        assert (paid.status_code, paid.json()["cumulativeAmount"]) == (201, "1"), paid.text


def test_an_operator_resumes_a_suspended_channel_from_the_cli(
    make_indexer: Callable[..., Indexer],
    db: Database,
    store_url: str,
    w3: Web3,
    devnet: Devnet,
    hub_deployment: Deployment,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    tmp_path: object,
) -> None:
    from pathlib import Path

    from tests.servers import forked_cli

    assert isinstance(tmp_path, Path)
    indexer = make_indexer(confirmations=1)
    snapshot = w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    mine(w3, 2)
    indexer.catch_up()
    w3.provider.make_request(RPCEndpoint("evm_revert"), [snapshot])
    again = open_channel(accounts[5], accounts[6].address, amount=300, salt=channel.salt)  # same id, more money
    assert again.id == channel.id
    mine(w3, 5)
    indexer.catch_up()
    assert stored(db, channel).suspended_reason is not None

    record = tmp_path / "deployment.json"
    hub_deployment.save(record)
    env = {
        "SETTLEMENT_RPC_URL": devnet.url,
        "SETTLEMENT_DEPLOYMENT_FILE": str(record),
        "SETTLEMENT_DATABASE_URL": store_url,
        "SETTLEMENT_CONFIRMATIONS": "1",
    }
    result = forked_cli("resume", channel.hex_id, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout
    state = stored(db, channel)
    assert (state.suspended_reason, state.deposit) == (None, 300)
    missing = forked_cli("resume", "0x" + "77" * 32, env=env, cwd=tmp_path)
    assert missing.returncode == 1
    assert "channel_not_found" in missing.stderr


def test_a_lookup_searches_only_the_blocks_after_the_indexers_cursor(
    make_indexer: Callable[..., Indexer],
    w3: Web3,
    open_channel: Callable[..., HubChannel],
    accounts: list[LocalAccount],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The salt is only in the ChannelOpened log; it used to be searched from the deployment block on every lookup
    (O(chain length), and refused by providers that cap log ranges)."""
    indexer = make_indexer()
    indexer.batch_blocks = 1_000
    w3.provider.make_request(RPCEndpoint("anvil_mine"), [hex(300)])
    indexer.catch_up()
    cursor = indexer.progress.cursor if indexer.progress else 0
    channel = open_channel(accounts[5], accounts[6].address, amount=100)
    ranges: list[tuple[int, int]] = []
    real_logs = indexer._logs

    def logged(from_block: int, to_block: int, topics: Any = None) -> Any:
        ranges.append((from_block, to_block))
        return real_logs(from_block, to_block, topics)

    monkeypatch.setattr(indexer, "_logs", logged)
    found = indexer.lookup(channel.hex_id)
    assert found is not None and found.salt == "0x" + channel.salt.hex()
    assert ranges == [(cursor + 1, w3.eth.block_number)]
