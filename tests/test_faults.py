"""Fault injection with real processes: `settlement serve` killed with SIGKILL at the dangerous moments of a
settlement, the RPC and the database cut under load, reorgs made with evm_snapshot/evm_revert, a payer closing while
nothing watches, and racing submissions over HTTP. docs/reliability.md maps each scenario to its test here or
elsewhere. Every test checks the money: what the hub credited equals what the service acknowledged."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from sqlalchemy.engine import make_url
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import TransactionNotFound
from web3.types import RPCEndpoint

from scripts.proc_cpu import children
from settlement.devtools.devnet import Devnet
from settlement.domain.model import ChannelViewField
from settlement.sdk.payer import PayerClient
from settlement.store import Database
from settlement.store import settlements as batch_q
from settlement.store.settlements import Batch, SentTx
from tests.hub_helpers import (
    Channel,
    body,
    credited,
    free_test_port,
    send,
    settled_on_chain,
    stored_payments,
    stream_through,
    wait_until,
)
from tests.proxy import TcpProxy
from tests.servers import ServiceProcess

pytestmark = [pytest.mark.faults, pytest.mark.slow]

Sign = Callable[..., bytes]
Engine = Callable[..., ServiceProcess]


@pytest.fixture
def settler(accounts: list[LocalAccount]) -> LocalAccount:
    return accounts[19]


@pytest.fixture
def payee(accounts: list[LocalAccount]) -> str:
    return str(accounts[7].address)


@pytest.fixture
def engine_process(spawn: Callable[..., ServiceProcess], settler: LocalAccount) -> Engine:
    """Factory: engine_process(database_url, **settings) -> `settlement serve` with the engine on, settling every
    0.3 s with the settler account; call `.kill()` / `.start()` on it for a crash and a restart."""

    def make(database_url: str, name: str = "service", **settings: str) -> ServiceProcess:
        options = {
            "engine_enabled": "true",
            "private_key": HexBytes(settler.key).to_0x_hex(),
            "settle_interval": "0.3",
            "engine_tick": "0.1",
            **settings,
        }
        return spawn(database_url, name, **options)

    return make


def pay(service: ServiceProcess, channel: Channel, amount: int, sign: Sign) -> httpx.Response:
    return httpx.post(
        f"{service.url}/v1/vouchers", json=body(channel, amount, sign(channel.payer, channel.id, amount)), timeout=10
    )


def batches(url: str) -> list[tuple[Batch, list[SentTx]]]:
    """Every batch in the store (newest first) with its signed transactions."""
    db = Database(url)
    try:
        with db.read() as conn:
            return [(batch, batch_q.txs_of(conn, batch.batch_id)) for batch, _ in batch_q.recent_batches(conn)]
    finally:
        db.dispose()


def mine(w3: Web3, blocks: int = 1) -> None:
    for _ in range(blocks):
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])


def automine(w3: Web3, on: bool) -> None:
    w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [on])


def confirmed_once(url: str) -> Batch:
    """The store holds exactly one batch and it is confirmed; returns it."""
    wait_until(lambda: [b.status for b, _ in batches(url)] == ["confirmed"])
    [(batch, _)] = batches(url)
    return batch


# --- 1-3: the settlement engine killed at each step ---------------------------------------------------------------


def test_killed_between_the_intent_and_the_broadcast_settles_once(
    engine_process: Engine,
    store_url: str,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    settler: LocalAccount,
    payee: str,
    hub: Contract,
    w3: Web3,
    sign: Sign,
    mining: str,
) -> None:
    """The intent is stored but no transaction exists yet (the settler cannot pay for gas, so the engine holds the
    intent): kill -9 there, fund the settler, restart."""
    channel = open_channel(accounts[5], payee)
    nonce, funds = w3.eth.get_transaction_count(settler.address), w3.eth.get_balance(settler.address)
    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [settler.address, hex(10**9)])
    service = engine_process(store_url)
    assert pay(service, channel, 777, sign).status_code == 201
    wait_until(lambda: "low_funds" in service.log.read_text())
    assert [(b.status, txs) for b, txs in batches(store_url)] == [("pending", [])]
    service.kill()

    w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [settler.address, hex(funds)])
    service.start()
    batch = confirmed_once(store_url)
    assert (settled_on_chain(hub, channel), credited(hub, payee)) == (777, 777)
    assert w3.eth.get_transaction_count(settler.address) == nonce + 1 == batch.nonce + 1  # same nonce: no gap


def test_killed_after_the_broadcast_before_mining_has_no_double_effect_and_no_nonce_gap(
    engine_process: Engine,
    store_url: str,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    settler: LocalAccount,
    payee: str,
    hub: Contract,
    w3: Web3,
    sign: Sign,
) -> None:
    """Mining is paused, so the transaction sits in the node's pool when the engine dies; the restarted engine sees
    the stored transaction, re-broadcasts it ('already known') and records it once mined."""
    channel = open_channel(accounts[5], payee)
    nonce = w3.eth.get_transaction_count(settler.address)
    service = engine_process(store_url)
    automine(w3, False)
    try:
        assert pay(service, channel, 555, sign).status_code == 201
        wait_until(lambda: any(tx.sent_at for _, txs in batches(store_url) for tx in txs))
        [(_, [sent])] = batches(store_url)
        assert w3.eth.get_transaction(HexBytes(sent.tx_hash))["blockNumber"] is None  # in the pool, not mined
        service.kill()
        service.start()
        time.sleep(1)  # several ticks of the restarted engine while the transaction is still pending
        mine(w3)
    finally:
        automine(w3, True)
    batch = confirmed_once(store_url)
    assert (settled_on_chain(hub, channel), credited(hub, payee)) == (555, 555)
    assert w3.eth.get_transaction_count(settler.address) == nonce + 1
    assert batch.tx_hash == sent.tx_hash  # the transaction signed before the crash is the one that counted


def test_killed_after_mining_before_recording_is_marked_settled_from_the_chain(
    engine_process: Engine,
    store_url: str,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    settler: LocalAccount,
    payee: str,
    hub: Contract,
    w3: Web3,
    sign: Sign,
) -> None:
    """With 2 confirmations the engine records a batch only 2 blocks after it is mined; it dies in between."""
    channel = open_channel(accounts[5], payee)
    mine(w3, 2)
    nonce = w3.eth.get_transaction_count(settler.address)
    service = engine_process(store_url, confirmations="2")
    assert pay(service, channel, 444, sign).status_code == 201
    wait_until(lambda: settled_on_chain(hub, channel) == 444)  # mined; nothing else mines, so it stays too shallow
    time.sleep(0.5)
    [(batch, [sent])] = batches(store_url)
    assert batch.status == "sent"
    service.kill()

    mine(w3, 2)
    service.start()
    batch = confirmed_once(store_url)
    receipt = w3.eth.get_transaction_receipt(HexBytes(sent.tx_hash))
    assert (batch.tx_hash, batch.block_number) == (sent.tx_hash, receipt["blockNumber"])
    assert credited(hub, payee) == 444
    assert w3.eth.get_transaction_count(settler.address) == nonce + 1


# --- 4: the RPC down ---------------------------------------------------------------------------------------------


def test_rpc_outage_ingest_goes_on_for_known_channels_and_settlement_catches_up(
    engine_process: Engine,
    store_url: str,
    devnet: Devnet,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    payee: str,
    hub: Contract,
    sign: Sign,
    mining: str,
) -> None:
    with TcpProxy(devnet.port) as proxy:
        service = engine_process(store_url, rpc_url=proxy.url, engine_backoff_max="1")
        known = open_channel(accounts[5], payee)
        assert pay(service, known, 10, sign).status_code == 201
        wait_until(lambda: credited(hub, payee) == 10)

        proxy.cut()
        assert [pay(service, known, amount, sign).status_code for amount in (20, 30)] == [201, 201]
        unknown = open_channel(accounts[6], payee)  # opened while the service cannot see the chain
        answer = pay(service, unknown, 5, sign)
        assert (answer.status_code, answer.json()["code"]) == (503, "chain_unavailable")
        wait_until(lambda: "retrying in 1.0s" in service.log.read_text())  # the engine backs off, up to the cap
        assert credited(hub, payee) == 10

        proxy.mend()
        assert pay(service, unknown, 5, sign).status_code == 201
        wait_until(lambda: credited(hub, payee) == 35)
        assert (settled_on_chain(hub, known), settled_on_chain(hub, unknown)) == (30, 5)


def test_serve_starts_through_a_fallback_while_its_primary_rpc_is_down(
    spawn: Callable[..., ServiceProcess], store_url: str, devnet: Devnet
) -> None:
    """`serve` built the service through the primary and its fallbacks, then, with confirmations configured (2 by
    default), asked the primary alone whether the chain mines only on transactions: a start during the primary's
    outage failed there (`chain_unavailable`), its fallbacks up. It asks through the service's connection now."""
    down = f"http://127.0.0.1:{free_test_port()}"
    service = spawn(store_url, rpc_url=down, rpc_fallback_urls=json.dumps([devnet.url]), confirmations="2")
    assert httpx.get(f"{service.url}/ready", timeout=10).status_code == 200
    log = service.log.read_text()
    assert f"RPC failover: now using {devnet.url}" in log
    assert "this chain mines a block only when a transaction arrives: with SETTLEMENT_CONFIRMATIONS=2" in log


def test_the_rpc_urls_key_is_never_shown_to_a_client_nor_written_to_the_log(
    spawn: Callable[..., ServiceProcess],
    store_url: str,
    devnet: Devnet,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    payee: str,
    sign: Sign,
) -> None:
    """A provider's RPC URL carries its API key (`/v2/<key>`, `?apikey=`). While the chain did not answer, the 503 a
    client got for a channel the service had to look up, and `/ready`'s answer to anyone, quoted requests' failure,
    which names the URL it was sending to: any client could read the operator's key off them. The log named every
    URL whole at each failover. Now only the scheme, host and port are written, and `/…` for the rest."""
    secret = "sk" + uuid.uuid4().hex
    with TcpProxy(devnet.port) as proxy:
        service = spawn(
            store_url,
            rpc_url=f"{proxy.url}/?apikey={secret}",
            # anvil answers this path 404: a failing fallback
            rpc_fallback_urls=json.dumps([f"{proxy.url}/v2/{secret}"]),
            indexer_interval="0.2",
        )
        proxy.cut()
        unknown = open_channel(accounts[6], payee)  # opened while the service cannot see the chain

        def refused_naming_the_url(call: Callable[[], httpx.Response], reading: str = "") -> httpx.Response:
            """The refusal once requests names the URL in it (a new connection refused, not a pooled one cut), of a
            failure `reading` what is named (a poll cut between its two reads failed reading the cursor's block; the
            next poll fails reading the head)."""
            answers: list[httpx.Response] = []

            def names_it() -> bool:
                answers.append(call())
                text = answers[-1].text
                return "Max retries exceeded with url: " in text and f"reading {reading}" in text

            wait_until(names_it)
            return answers[-1]

        answer = refused_naming_the_url(lambda: pay(service, unknown, 5, sign))
        assert (answer.status_code, answer.json()["code"]) == (503, "chain_unavailable")
        assert secret not in answer.text
        assert "Max retries exceeded with url: … (" in answer.json()["message"]
        ready = refused_naming_the_url(lambda: httpx.get(f"{service.url}/ready", timeout=10), "the chain head")
        assert (ready.status_code, ready.json()["code"]) == (503, "chain_unavailable")
        assert (  # the indexer's poll or the readiness check's own read of the head, whichever failed first
            "reading the chain head: the chain's RPC does not answer (HTTPConnectionPool(host='127.0.0.1', "
            f"port={proxy.port}): Max retries exceeded with url: … (" in ready.json()["message"]
        )
        assert secret not in ready.text
        proxy.mend()
        assert pay(service, unknown, 5, sign).status_code == 201
    log = service.log.read_text()
    assert secret not in log
    assert f"RPC {proxy.url}/… failed (ConnectionError)" in log


# --- 5: reorgs within the confirmation depth ---------------------------------------------------------------------


def test_a_reorged_out_top_up_never_backs_a_voucher(
    engine_process: Engine,
    store_url: str,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    payee: str,
    hub: Contract,
    w3: Web3,
    sign: Sign,
) -> None:
    channel = open_channel(accounts[5], payee, amount=100)
    mine(w3, 2)
    service = engine_process(store_url, confirmations="2")
    fork = w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    send(w3, hub.functions.topUp(channel.id, 900), channel.payer.address, value=900)
    refused = pay(service, channel, 500, sign)  # the top-up is not confirmed yet
    assert (refused.status_code, refused.json()["code"]) == (409, "amount_exceeds_deposit")

    assert w3.provider.make_request(RPCEndpoint("evm_revert"), [fork])["result"] is True  # the top-up never happened
    mine(w3, 3)
    url = f"{service.url}/v1/channels/{channel.hex_id}"
    wait_until(lambda: httpx.get(f"{service.url}/ready").json()["indexedBlock"] >= w3.eth.block_number - 2)
    assert httpx.get(url).json()["deposit"] == "100"
    assert pay(service, channel, 500, sign).json()["code"] == "amount_exceeds_deposit"
    assert pay(service, channel, 100, sign).status_code == 201
    wait_until(lambda: credited(hub, payee) == 100)
    assert hub.functions.channel(channel.id).call()[ChannelViewField.DEPOSIT] == 100  # the deposit the hub holds


def test_a_settlement_reorged_out_is_sent_again(
    engine_process: Engine,
    store_url: str,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    settler: LocalAccount,
    payee: str,
    hub: Contract,
    w3: Web3,
    sign: Sign,
) -> None:
    channel = open_channel(accounts[5], payee)
    mine(w3, 2)
    nonce = w3.eth.get_transaction_count(settler.address)
    service = engine_process(store_url, confirmations="2")
    fork = w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]
    assert pay(service, channel, 77, sign).status_code == 201
    wait_until(lambda: settled_on_chain(hub, channel) == 77)  # mined, not yet 2 deep
    [(_, [sent])] = batches(store_url)

    assert service.process is not None
    service.process.send_signal(signal.SIGSTOP)  # hold the engine still while the chain forks under it
    try:
        assert w3.provider.make_request(RPCEndpoint("evm_revert"), [fork])["result"] is True
        with pytest.raises(TransactionNotFound):
            w3.eth.get_transaction(HexBytes(sent.tx_hash))  # the settlement is gone from the chain and the pool
        assert (settled_on_chain(hub, channel), credited(hub, payee)) == (0, 0)
    finally:
        service.process.send_signal(signal.SIGCONT)
    wait_until(lambda: settled_on_chain(hub, channel) == 77)  # the engine sent the stored transaction again
    mine(w3, 2)
    batch = confirmed_once(store_url)
    assert batch.tx_hash == sent.tx_hash and credited(hub, payee) == 77
    assert w3.eth.get_transaction_count(settler.address) == nonce + 1


# --- 7: the payer closes while the service is down ---------------------------------------------------------------


@pytest.mark.parametrize(("asleep", "alert"), [(3000, "close_deadline_at_risk"), (3700, "close_deadline_missed")])
def test_a_close_while_the_service_is_down(
    engine_process: Engine,
    store_url: str,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    payee: str,
    hub: Contract,
    w3: Web3,
    sign: Sign,
    asleep: int,
    alert: str,
    mining: str,
) -> None:
    """The hub's challenge period is an hour. Back 50 minutes later: the latest voucher is settled at once and an
    alert says the deadline was near. Back after 61 minutes: too late, and a critical alert says so."""
    channel = open_channel(accounts[5], payee)
    service = engine_process(store_url, settle_interval="3600", close_alert_seconds="900")
    assert [pay(service, channel, amount, sign).status_code for amount in (40, 90)] == [201, 201]
    service.kill()
    send(w3, hub.functions.requestClose(channel.id), channel.payer.address)  # only 0 of the 90 is settled
    w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [asleep])
    mine(w3)

    service.start()
    wait_until(lambda: f"ALERT {alert}" in service.log.read_text())  # the alert line (logged at CRITICAL)
    if alert == "close_deadline_at_risk":
        wait_until(lambda: credited(hub, payee) == 90)
    else:
        time.sleep(1)
        assert credited(hub, payee) == 0  # past the deadline the hub refuses the voucher


# --- 8: racing submissions over HTTP -----------------------------------------------------------------------------


def test_fifty_concurrent_submissions_over_http_end_in_one_state(
    spawn: Callable[..., ServiceProcess],
    store_url: str,
    open_channel: Callable[..., Channel],
    accounts: list[LocalAccount],
    payee: str,
    sign: Sign,
) -> None:
    channel = open_channel(accounts[5], payee, amount=10**6)
    service = spawn(store_url)
    amounts = [(i * 7 % 25 + 1) * 10 for i in range(50)]  # higher, equal and lower, interleaved: 10 .. 250
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda amount: pay(service, channel, amount, sign), amounts))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 201, 409}, statuses
    for amount, answer in zip(amounts, answers, strict=True):
        if answer.status_code == 409:
            assert answer.json()["code"] == "stale_voucher"
            assert int(answer.json()["currentCumulativeAmount"]) >= amount
        else:
            assert answer.json()["cumulativeAmount"] == str(amount)

    stored = sorted(stored_payments(store_url, channel.hex_id), key=lambda r: r.cumulative)
    assert stored[-1].cumulative == max(amounts)
    assert sum(r.increment for r in stored) == max(amounts)  # increments chain up: nothing lost, nothing twice
    assert statuses.count(201) == len(stored)
    for answer in answers:  # idempotent: any voucher that was accepted gets the same receipt again
        if answer.status_code in (200, 201):
            again = pay(service, channel, int(answer.json()["cumulativeAmount"]), sign)
            assert (again.status_code, again.json()) == (200, answer.json())


# --- 9: the database cut under load -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_outages_during_ingest_lose_no_acknowledged_voucher(
    spawn: Callable[..., ServiceProcess],
    fresh_postgres: str,
    devnet: Devnet,
    accounts: list[LocalAccount],
    tmp_path: Path,
) -> None:
    """Every connection to PostgreSQL is reset twice while a payer streams payments (what a server restart looks
    like to the service). Jepsen-style check: every receipt the payer holds is in the store afterwards."""
    server = make_url(fresh_postgres)
    with TcpProxy(server.port or 5432) as proxy:
        service = spawn(server.set(port=proxy.port).render_as_string(hide_password=False))
        client = PayerClient(
            HexBytes(accounts[12].key).to_0x_hex(),
            devnet.url,
            service.url,
            retries=30,
            backoff=0.1,
            state_path=tmp_path / "journal.sqlite3",
        )
        try:
            channel = client.open_channel(accounts[11].address, 10**9)
            client.wait_until_known(channel)

            def outage() -> None:
                proxy.cut()
                time.sleep(1.5)
                proxy.mend()

            receipts = stream_through(client, channel, outage)
            position = client.position(channel)
        finally:
            client.shutdown()
    stored = {(r.cumulative, r.increment) for r in stored_payments(fresh_postgres, channel.hex_id)}
    assert {(r.cumulative, r.increment) for r in receipts} <= stored
    assert sum(i for _, i in stored) == 3 * len(receipts)  # the payee got exactly what the app paid, not more
    assert max(c for c, _ in stored) == position
    assert len(receipts) >= 80


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines."""
    found = {}
    for child in children(pid):
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile
    return found


def _started(server: int, marker: str) -> list[int]:
    """The children of `server` whose command line holds `marker`, once there is one."""
    wait_until(lambda: any(marker in command for command in _children(server).values()))
    return [pid for pid, command in _children(server).items() if marker in command]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited: only its parent's wait is missing


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_the_signature_recovery_worker_never_outlives_its_server(
    spawn: Callable[..., ServiceProcess], store_url: str, how: str
) -> None:
    """`settlement serve` starts a worker process for batches' signatures: stopped with the server, and gone within
    seconds when the server is killed -9 (no shutdown hook ran), rather than left behind for good."""
    service = spawn(store_url, recovery_processes="1")
    assert service.process is not None
    server = service.process.pid
    workers = _started(server, "multiprocessing")  # the worker (and multiprocessing's resource tracker, if one runs)
    service.kill() if how == "kill" else service.stop()
    wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=10)


def test_a_stopped_recovery_worker_does_not_hold_the_service_shutdown(
    spawn: Callable[..., ServiceProcess], store_url: str
) -> None:
    """A worker frozen (SIGSTOP: a debugger, a stuck page-in) when the service is asked to stop: the server waits
    for it a moment, then kills it and exits, rather than wait for it for good (SIGTERM, then our 30 s kill)."""
    service = spawn(store_url, recovery_processes="1")
    assert service.process is not None
    server = service.process
    (worker,) = _started(server.pid, "spawn_main")  # the worker alone
    os.kill(worker, signal.SIGSTOP)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=20) == -signal.SIGTERM  # uvicorn ends by re-raising the signal it shut down on
    wait_until(lambda: not _alive(worker), timeout=5)
