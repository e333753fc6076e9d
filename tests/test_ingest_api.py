"""POST /v1/vouchers end to end on the real hub and both stores: receipts, idempotency, every error code."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from pydantic_core import to_json
from sqlalchemy import event
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint

from settlement.api.schemas import BatchOut, ReceiptOut
from settlement.domain.ledger import receipt_body
from settlement.domain.model import ChannelId, ChannelViewField, Receipt
from settlement.eip712.vouchers import Domain
from settlement.indexer.follower import Indexer
from tests.hub_helpers import (
    ETH,
    Channel,
    behind_the_fast_path,
    body,
    database_down,
    recovered,
    send,
    service_of,
    wait_until,
    workers_ready,
)

Sign = Callable[..., bytes]


@pytest.fixture
def payer(accounts: list[LocalAccount]) -> LocalAccount:
    return accounts[5]


@pytest.fixture
def payee(accounts: list[LocalAccount]) -> str:
    return str(accounts[6].address)


@pytest.fixture
def channel(open_channel: Callable[..., Channel], payer: LocalAccount, payee: str) -> Channel:
    return open_channel(payer, payee, amount=1_000)


def test_accepts_then_answers_a_resend_with_the_same_receipt(
    api: Callable[..., TestClient], channel: Channel, sign: Sign
) -> None:
    client = api()
    first = client.post("/v1/vouchers", json=body(channel, 100, sign(channel.payer, channel.id, 100), reference="o-1"))
    assert first.status_code == 201, first.text
    receipt = first.json()
    assert receipt["channelId"] == channel.hex_id
    assert (receipt["cumulativeAmount"], receipt["increment"], receipt["remaining"]) == ("100", "100", "900")
    assert receipt["reference"] == "o-1"
    again = client.post("/v1/vouchers", json=body(channel, 100, sign(channel.payer, channel.id, 100), reference="o-1"))
    assert again.status_code == 200
    assert again.json() == receipt
    # the same voucher with another (unsigned) reference is reported, never answered with the first one's
    other = client.post("/v1/vouchers", json=body(channel, 100, sign(channel.payer, channel.id, 100), reference="x"))
    assert (other.status_code, other.json()["code"]) == (409, "exists_with_different_metadata")
    assert other.json()["receipt"] == receipt
    second = client.post("/v1/vouchers", json=body(channel, 250, sign(channel.payer, channel.id, 250)))
    assert second.status_code == 201
    assert (second.json()["increment"], second.json()["remaining"]) == ("150", "750")
    # an older voucher that was accepted once is still a re-send, not an error
    assert client.post("/v1/vouchers", json=body(channel, 100, sign(channel.payer, channel.id, 100))).json() == receipt

    state = client.get(f"/v1/channels/{channel.hex_id}").json()
    assert state["acceptedCumulativeAmount"] == "250"
    assert state["deposit"] == "1000"
    assert state["unsettled"] == "250"
    assert state["status"] == "open"
    assert state["payer"] == channel.payer.address
    payments = client.get(f"/v1/channels/{channel.hex_id}/payments").json()
    assert [p["cumulativeAmount"] for p in payments["items"]] == ["250", "100"]
    assert payments["nextCursor"] is None


def test_payments_paginate_newest_first(api: Callable[..., TestClient], channel: Channel, sign: Sign) -> None:
    client = api()
    for amount in range(1, 8):
        assert client.post(
            "/v1/vouchers", json=body(channel, amount, sign(channel.payer, channel.id, amount))
        ).is_success
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/channels/{channel.hex_id}/payments", params=params).json()
        seen += [p["cumulativeAmount"] for p in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == [str(n) for n in range(7, 0, -1)]
    # A cursor naming no payment of this channel (compacted, another channel's, made up) still means "ids below it".
    url = f"/v1/channels/{channel.hex_id}/payments"
    seventh = int(client.get(url, params={"limit": 1}).json()["nextCursor"])  # the id of the newest payment
    made_up = client.get(url, params={"cursor": seventh + 10**6}).json()["items"]
    assert [p["cumulativeAmount"] for p in made_up] == [str(n) for n in range(7, 0, -1)]
    below_sixth = client.get(url, params={"cursor": seventh - 1}).json()["items"]  # the sixth's id: a stored one
    assert [p["cumulativeAmount"] for p in below_sixth] == [str(n) for n in range(5, 0, -1)]


def test_batch_accepts_valid_items_whatever_the_others_do(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    client = api()
    items = [
        body(channel, 10, sign(channel.payer, channel.id, 10)),
        body(channel, 20, sign(accounts[9], channel.id, 20)),  # wrong signer
        body(channel, 30, sign(channel.payer, channel.id, 30)),
        body(channel, 10, sign(channel.payer, channel.id, 10)),  # re-send of the first
        body(channel, 5_000, sign(channel.payer, channel.id, 5_000)),  # above the deposit
        body(channel, 25, sign(channel.payer, channel.id, 25)),  # below what the batch already accepted
    ]
    answer = client.post("/v1/vouchers/batch", json={"vouchers": items})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [r["status"] for r in result["results"]] == [201, 400, 201, 200, 409, 409]
    assert [r["error"]["code"] for r in result["results"] if r["error"]] == [
        "invalid_signature",
        "amount_exceeds_deposit",
        "stale_voucher",
    ]
    assert (result["accepted"], result["duplicates"], result["rejected"]) == (2, 1, 3)
    assert result["results"][2]["receipt"]["increment"] == "20"


@pytest.mark.parametrize(("threads", "processes"), [(1, 0), (3, 0), (2, 1), (2, 3)])
def test_a_large_batch_recovered_off_the_event_loop_keeps_each_result_in_its_place(
    api: Callable[..., TestClient],
    channel: Channel,
    sign: Sign,
    accounts: list[LocalAccount],
    threads: int,
    processes: int,
) -> None:
    client = api(recovery_threads=threads, recovery_processes=processes)
    if processes:
        workers_ready(client)
    forged = {n for n in range(1, 41) if n % 7 == 0}  # 40 items: the threads or workers get uneven parts
    items = [body(channel, n, sign(accounts[9] if n in forged else channel.payer, channel.id, n)) for n in range(1, 41)]
    result = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()
    assert [r["status"] for r in result["results"]] == [400 if n in forged else 201 for n in range(1, 41)]
    assert [r["receipt"]["cumulativeAmount"] for r in result["results"] if r["receipt"]] == [
        str(n) for n in range(1, 41) if n not in forged
    ]
    assert client.get(f"/v1/channels/{channel.hex_id}").json()["acceptedCumulativeAmount"] == "40"
    assert (recovered(client, "process"), recovered(client, "thread")) == ((40, 0) if processes else (0, 40))


def test_a_killed_recovery_worker_costs_a_recovery_on_threads_then_a_new_worker_takes_over(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    """A worker process that dies (the OOM killer, an operator's kill) must not fail a payment: the request in flight
    is recovered on threads, and new workers start."""
    before = set(multiprocessing.active_children())
    client = api(recovery_processes=1)
    workers_ready(client)
    (worker,) = set(multiprocessing.active_children()) - before

    def batch(start: int) -> list[int]:
        amounts = range(start, start + 20)
        items = [body(channel, n, sign(accounts[9] if n % 5 == 0 else channel.payer, channel.id, n)) for n in amounts]
        return [r["status"] for r in client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]]

    expected = [400 if n % 5 == 0 else 201 for n in range(1, 21)]
    assert batch(1) == expected
    assert (recovered(client, "process"), recovered(client, "thread")) == (20, 0)
    os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
    worker.join(timeout=10)
    assert batch(21) == expected
    assert (recovered(client, "process"), recovered(client, "thread")) == (20, 20)
    workers_ready(client)
    assert batch(41) == expected
    assert (recovered(client, "process"), recovered(client, "thread")) == (40, 20)
    assert client.get(f"/v1/channels/{channel.hex_id}").json()["acceptedCumulativeAmount"] == "59"


def test_a_machine_that_cannot_start_a_recovery_worker_still_serves_batches_on_threads(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process limit, no file descriptors left for its pipes: the service starts anyway and recovers on threads."""

    def refused(_: str) -> Any:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr("settlement.ingest.recovery.multiprocessing.get_context", refused)
    client = api(recovery_processes=1)
    items = [body(channel, n, sign(channel.payer, channel.id, n)) for n in range(1, 21)]
    results = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    assert [r["status"] for r in results] == [201] * 20
    assert (recovered(client, "process"), recovered(client, "thread")) == (0, 20)
    assert service_of(client).ingestor.recovery.processes == 0


def test_a_hung_recovery_worker_is_ended_and_the_request_recovered_on_threads(
    api: Callable[..., TestClient],
    channel: Channel,
    sign: Sign,
    accounts: list[LocalAccount],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that takes no more tasks (stopped here; stuck, swapped out) must not hold payments: past the deadline
    the request is recovered on threads, the worker is killed, and new ones take over."""
    before = set(multiprocessing.active_children())
    client = api(recovery_processes=1)
    service_of(client).ingestor.recovery.deadline = 0.5
    workers_ready(client)
    (worker,) = set(multiprocessing.active_children()) - before
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSTOP)
    items = [body(channel, n, sign(accounts[9] if n == 7 else channel.payer, channel.id, n)) for n in range(1, 21)]
    with caplog.at_level(logging.ERROR, logger="settlement.ingest.recovery"):
        results = client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]
    assert [r["status"] for r in results] == [400 if n == 7 else 201 for n in range(1, 21)]
    assert (recovered(client, "process"), recovered(client, "thread")) == (0, 20)
    assert [r.getMessage() for r in caplog.records if r.name == "settlement.ingest.recovery"] == [
        "recovery workers did not answer in 0.5 s: ended, new ones starting"  # a hang, not taken for a death
    ]
    worker.join(timeout=10)
    assert worker.exitcode == -signal.SIGKILL
    workers_ready(client)
    items = [body(channel, n, sign(channel.payer, channel.id, n)) for n in range(21, 41)]
    assert [r["status"] for r in client.post("/v1/vouchers/batch", json={"vouchers": items}).json()["results"]] == [
        201
    ] * 20
    assert (recovered(client, "process"), recovered(client, "thread")) == (20, 20)


def test_batch_over_the_limit_is_refused_whole(api: Callable[..., TestClient], channel: Channel, sign: Sign) -> None:
    client = api(batch_max_items=3)
    items = [body(channel, n, sign(channel.payer, channel.id, n)) for n in range(1, 5)]
    answer = client.post("/v1/vouchers/batch", json={"vouchers": items})
    assert answer.status_code == 413
    assert answer.json()["code"] == "batch_too_large"
    assert client.get(f"/v1/channels/{channel.hex_id}").json()["acceptedCumulativeAmount"] == "0"


# --- one negative test per signed field: change only that field, the voucher must be refused -----------------------


@pytest.mark.parametrize("field", ["chain_id", "contract", "channel", "amount", "signature"])
def test_each_signed_field_is_bound(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, domain: Domain, field: str
) -> None:
    client = api()
    amount, signed_amount, signed_channel, other = 40, 40, channel.id, None
    if field == "chain_id":
        other = Domain(chain_id=domain.chain_id + 1, verifying_contract=domain.verifying_contract)
    elif field == "contract":
        other = Domain(chain_id=domain.chain_id, verifying_contract="0x" + "11" * 20)
    elif field == "channel":
        signed_channel = bytes(31) + b"\x07"
    elif field == "amount":
        signed_amount = 39
    signature = sign(channel.payer, signed_channel, signed_amount, other)
    if field == "signature":
        signature = signature[:10] + bytes([signature[10] ^ 1]) + signature[11:]
    answer = client.post("/v1/vouchers", json=body(channel, amount, signature))
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_signature"
    assert client.post("/v1/vouchers", json=body(channel, amount, sign(channel.payer, channel.id, amount))).is_success


# --- each error code ------------------------------------------------------------------------------------------------


def test_stale_voucher_carries_the_current_value(api: Callable[..., TestClient], channel: Channel, sign: Sign) -> None:
    client = api()
    assert client.post("/v1/vouchers", json=body(channel, 70, sign(channel.payer, channel.id, 70))).status_code == 201
    answer = client.post("/v1/vouchers", json=body(channel, 60, sign(channel.payer, channel.id, 60)))
    assert answer.status_code == 409
    assert answer.json()["code"] == "stale_voucher"
    assert answer.json()["currentCumulativeAmount"] == "70"


def test_amount_above_the_deposit(api: Callable[..., TestClient], channel: Channel, sign: Sign) -> None:
    answer = api().post("/v1/vouchers", json=body(channel, 1_001, sign(channel.payer, channel.id, 1_001)))
    assert answer.status_code == 409
    assert (answer.json()["code"], answer.json()["deposit"]) == ("amount_exceeds_deposit", "1000")


def test_unknown_channel(api: Callable[..., TestClient], channel: Channel, sign: Sign) -> None:
    ghost = Channel(id=b"\x42" * 32, payer=channel.payer, payee=channel.payee, token=ETH, salt=bytes(32))
    answer = api().post("/v1/vouchers", json=body(ghost, 5, sign(channel.payer, ghost.id, 5)))
    assert answer.status_code == 404
    assert answer.json()["code"] == "channel_not_found"


def test_unconfirmed_channel_then_confirmed(
    api: Callable[..., TestClient],
    open_channel: Callable[..., Channel],
    payer: LocalAccount,
    payee: str,
    sign: Sign,
    w3: Web3,
) -> None:
    client = api(confirmations=2)
    fresh = open_channel(payer, payee, amount=500)
    answer = client.post("/v1/vouchers", json=body(fresh, 5, sign(payer, fresh.id, 5)))
    assert answer.status_code == 409
    assert answer.json()["code"] == "channel_unconfirmed"
    for _ in range(2):
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    assert client.post("/v1/vouchers", json=body(fresh, 5, sign(payer, fresh.id, 5))).status_code == 201


def test_closed_channel(api: Callable[..., TestClient], channel: Channel, sign: Sign, w3: Web3, hub: Contract) -> None:
    client = api()
    assert client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10))).status_code == 201
    send(w3, hub.functions.closeByPayee(channel.id, 0, b""), channel.payee)
    _wait_for(client, channel, lambda state: state["status"] == "closed")
    answer = client.post("/v1/vouchers", json=body(channel, 20, sign(channel.payer, channel.id, 20)))
    assert answer.status_code == 409
    assert answer.json()["code"] == "channel_closed"


def test_a_channel_its_payee_stopped_takes_no_voucher_after_the_stop_which_answers_the_last_one(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, w3: Web3, hub: Contract
) -> None:
    """A payee closes a channel at once (closeByPayee) with the latest voucher the service holds, but the service
    learns of the close only once its indexer sees it, and acknowledged every voucher until then: none of those could
    ever be settled. The payee now stops the channel at the service first: the stop answers the latest voucher and
    every later one is refused (409 channel_closed); a re-send of an accepted voucher is still answered as accepted
    (a lost answer retried); a second stop answers the same; the close settles exactly what the service accepted."""
    client = api(indexer_interval=60)  # the close is not seen by the service within the test, as on a slow chain
    url = f"/v1/channels/{channel.hex_id}"
    for cumulative in (100, 250):
        paid = client.post("/v1/vouchers", json=body(channel, cumulative, sign(channel.payer, channel.id, cumulative)))
        assert paid.status_code == 201, paid.text
    before = int(time.time())
    stopped = client.post(f"{url}/stop", json={})
    assert stopped.status_code == 200, stopped.text
    state = stopped.json()
    assert (state["acceptedCumulativeAmount"], state["status"]) == ("250", "open")
    assert state["latestSignature"] == "0x" + sign(channel.payer, channel.id, 250).hex()
    assert before <= state["stoppedAt"] <= int(time.time())
    refused = client.post("/v1/vouchers", json=body(channel, 300, sign(channel.payer, channel.id, 300)))
    assert (refused.status_code, refused.json()["code"]) == (409, "channel_closed")
    assert refused.json()["stoppedAt"] == state["stoppedAt"]
    later = body(channel, 400, sign(channel.payer, channel.id, 400))
    batch = client.post("/v1/vouchers/batch", json={"vouchers": [later]})
    assert [item["error"]["code"] for item in batch.json()["results"]] == ["channel_closed"]
    again = client.post("/v1/vouchers", json=body(channel, 250, sign(channel.payer, channel.id, 250)))
    assert (again.status_code, again.json()["cumulativeAmount"]) == (200, "250")
    writes: list[str] = []
    engine = service_of(client).db.engine
    listen = event.listens_for(engine, "before_cursor_execute")
    noted = listen(lambda _c, _cur, statement, *_: writes.append(statement) if "UPDATE" in statement else None)
    for _ in range(5):
        assert client.post(f"{url}/stop", json={}).json() == state  # final: the same answer
    event.remove(engine, "before_cursor_execute", noted)
    assert writes == []  # and no write again: a flood of stops does not take the store's write lock from ingest
    assert client.get(url).json() == state
    assert client.post(f"/v1/channels/0x{'42' * 32}/stop", json={}).json()["code"] == "channel_not_found"
    bad: list[tuple[str, dict[str, Any], int, str]] = [
        (f"/v1/channels/0x{'zz' * 32}/stop", {"json": {}}, 400, "malformed_request"),  # not an id
        (f"/v1/channels/0x{'42' * 31}/stop", {"json": {}}, 400, "malformed_request"),  # 31 bytes
        (f"{url}/stop", {"json": {"cumulativeAmount": "1"}}, 400, "malformed_request"),  # a stop names nothing
        (f"{url}/stop", {"json": []}, 400, "malformed_request"),
        (f"{url}/stop", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "malformed_request"),
        (f"{url}/stop", {"content": b""}, 415, "unsupported_media_type"),  # no JSON body
    ]
    for path, sent, status, code in bad:
        answer = client.post(path, **sent)
        assert (answer.status_code, answer.json()["code"]) == (status, code), (path, sent)

    send(w3, hub.functions.closeByPayee(channel.id, 250, sign(channel.payer, channel.id, 250)), channel.payee)
    assert hub.functions.channel(channel.id).call()[ChannelViewField.SETTLED] == 250


def test_closing_channel_accepts_until_the_guard_by_the_chains_clock(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, w3: Web3, hub: Contract
) -> None:
    """The hub judges the deadline by its blocks' times. Once the chain's clock is 500 s from the deadline, inside
    the 600-s guard, the voucher is refused though this machine's clock says the hour has barely begun (a chain
    whose clock runs ahead: evm_increaseTime here, a sequencer's stamps elsewhere); before, it was accepted, and a
    chain already past the deadline would have left the payee a receipt it could never settle."""
    client = api(close_guard_seconds=600)
    send(w3, hub.functions.requestClose(channel.id), channel.payer.address)
    state = _wait_for(client, channel, lambda state: state["status"] == "closing")
    # the session hub's challenge period is an hour: 600 s before the deadline there is still time
    assert client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10))).status_code == 201
    moved = state["closeDeadline"] - 500 - int(w3.eth.get_block("latest")["timestamp"])
    w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [moved])
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    mined = int(w3.eth.get_block("latest")["timestamp"])
    later = api(close_guard_seconds=600)
    for each in (client, later):
        indexer: Indexer = service_of(each).indexer

        def caught_up(indexer: Indexer = indexer) -> bool:
            return indexer.block_time >= mined

        wait_until(caught_up)
        late = each.post("/v1/vouchers", json=body(channel, 20, sign(channel.payer, channel.id, 20)))
        assert (late.status_code, late.json()["code"]) == (409, "channel_closed"), late.text
        assert late.json()["closeDeadline"] == state["closeDeadline"]
        assert f"ends in {state['closeDeadline'] - indexer.block_time} s" in late.json()["message"]  # the chain's


def test_the_close_guard_counts_from_the_heads_time_not_the_confirmed_blocks(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, w3: Web3, hub: Contract
) -> None:
    """With confirmations, the indexer reads blocks `confirmations` deep, and the guard counted from the latest of
    those: up to that many blocks' time behind the head, from which the engine's final settle counts. A chain whose
    clock jumped at the head (here 3,100 s in one block) had ingest accept vouchers the engine no longer settles."""
    for _ in range(3):
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])  # the session's channel, 3 blocks deep
    client = api(close_guard_seconds=600, confirmations=3)
    send(w3, hub.functions.requestClose(channel.id), channel.payer.address)
    for _ in range(3):
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    state = _wait_for(client, channel, lambda state: state["status"] == "closing")
    assert client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10))).status_code == 201
    moved = state["closeDeadline"] - 500 - int(w3.eth.get_block("latest")["timestamp"])
    w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [moved])
    # mined: the head is 500 s from the deadline; the confirmed block is not
    w3.provider.make_request(RPCEndpoint("evm_mine"), [])
    head = w3.eth.get_block("latest")
    mined = int(head["timestamp"])
    indexer = service_of(client).indexer
    wait_until(lambda: indexer.progress is not None and indexer.progress.head >= head["number"])  # it saw the head
    late = client.post("/v1/vouchers", json=body(channel, 20, sign(channel.payer, channel.id, 20)))
    assert late.status_code == 409, late.text  # before: 201, a receipt the engine would not settle
    assert late.json()["code"] == "channel_closed"
    assert f"ends in {state['closeDeadline'] - mined} s" in late.json()["message"]


def _wait_for(client: TestClient, channel: Channel, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state: dict[str, Any] = client.get(f"/v1/channels/{channel.hex_id}").json()
        if done(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"channel never reached the expected state: {state}")


def test_amounts_out_of_range_are_refused_without_harming_the_batch(
    api: Callable[..., TestClient], channel: Channel, sign: Sign
) -> None:
    items = [
        body(channel, 0, sign(channel.payer, channel.id, 0)),
        {**body(channel, 1, sign(channel.payer, channel.id, 1)), "cumulativeAmount": str(2**256)},
        body(channel, 3, sign(channel.payer, channel.id, 3)),
    ]
    result = api().post("/v1/vouchers/batch", json={"vouchers": items}).json()
    assert [r["status"] for r in result["results"]] == [400, 400, 201]
    assert [r["error"]["code"] for r in result["results"][:2]] == ["amount_out_of_range"] * 2


@pytest.mark.faults
@pytest.mark.postgres
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_store_outage_answers_503_and_acknowledges_nothing(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, store_url: str
) -> None:
    client = api()
    assert client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10))).status_code == 201
    with database_down(store_url):
        answer = client.post("/v1/vouchers", json=body(channel, 20, sign(channel.payer, channel.id, 20)))
        assert answer.status_code == 503
        assert answer.json()["code"] == "store_unavailable"
        assert client.get("/ready").status_code == 503
    assert client.post("/v1/vouchers", json=body(channel, 20, sign(channel.payer, channel.id, 20))).status_code == 201
    payments = client.get(f"/v1/channels/{channel.hex_id}/payments").json()["items"]
    assert [p["cumulativeAmount"] for p in payments] == ["20", "10"]


# --- the fast path in front of FastAPI serves POST /v1/vouchers; the documented route must answer the same ----------


def test_the_fast_path_and_the_fastapi_route_give_the_same_answers(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    fast = api()
    route = behind_the_fast_path(fast)

    def voucher(n: int, signer: LocalAccount | None = None) -> dict[str, Any]:
        return body(channel, n, sign(signer or channel.payer, channel.id, n))

    first = route.post("/v1/vouchers", json=voucher(10))
    again = fast.post("/v1/vouchers", json=voucher(10))
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json()
    second = fast.post("/v1/vouchers", json=voucher(20))
    again = route.post("/v1/vouchers", json=voucher(20))
    assert (second.status_code, again.status_code) == (201, 200)
    assert second.json() == again.json()

    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"json": voucher(5)}, 409, "stale_voucher"),
        ({"json": voucher(30, accounts[9])}, 400, "invalid_signature"),
        ({"content": b'{"channelId": ', "headers": {"content-type": "application/json"}}, 400, "malformed_request"),
        ({"content": b"{}", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"json": {**voucher(30), "payer": "0x" + "11" * 20}}, 400, "malformed_request"),
    ]
    for request, status, code in refusals:
        answers = [client.post("/v1/vouchers", **request) for client in (fast, route)]
        assert [(a.status_code, a.json()["code"]) for a in answers] == [(status, code)] * 2
        assert answers[0].json() == answers[1].json()


def test_the_batch_route_answers_the_same_on_the_fast_path_and_behind_it(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, accounts: list[LocalAccount]
) -> None:
    """The fast path serves POST /v1/vouchers/batch too, its answer built without a model per item: each answer is,
    byte for byte, what the documented models (BatchOut, ReceiptOut) make of it, and FastAPI's route says the same."""
    fast = api(batch_max_items=4)
    route = behind_the_fast_path(fast)

    def voucher(n: int, signer: LocalAccount | None = None, **extra: Any) -> dict[str, Any]:
        return body(channel, n, sign(signer or channel.payer, channel.id, n), **extra)

    items = [voucher(10, reference="o-é"), voucher(20, accounts[9]), voucher(30, idempotencyKey="k-1"), voucher(5)]
    first = fast.post("/v1/vouchers/batch", json={"vouchers": items})
    again = route.post("/v1/vouchers/batch", json={"vouchers": items})
    assert (first.status_code, again.status_code) == (200, 200)
    assert [r["status"] for r in first.json()["results"]] == [201, 400, 201, 409]
    assert [r["status"] for r in again.json()["results"]] == [200, 400, 200, 409]
    for answer in (first, again):
        assert answer.content == BatchOut.model_validate_json(answer.content).model_dump_json().encode()
    assert [r["receipt"] for r in first.json()["results"]] == [r["receipt"] for r in again.json()["results"]]
    assert [r["error"] for r in first.json()["results"]] == [r["error"] for r in again.json()["results"]]
    single = fast.post("/v1/vouchers", json=voucher(40))
    assert single.content == ReceiptOut.model_validate_json(single.content).model_dump_json().encode()

    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"json": {"vouchers": [voucher(50)] * 5}}, 413, "batch_too_large"),
        ({"json": {"vouchers": [{**voucher(50), "payer": "0x" + "11" * 20}]}}, 400, "malformed_request"),
        ({"json": [voucher(50)]}, 400, "malformed_request"),
        ({"content": b'{"vouchers": [', "headers": {"content-type": "application/json"}}, 400, "malformed_request"),
        ({"content": b'{"vouchers": []}', "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ]
    for request, status, code in refusals:
        answers = [client.post("/v1/vouchers/batch", **request) for client in (fast, route)]
        assert [(a.status_code, a.json()["code"]) for a in answers] == [(status, code)] * 2
        assert answers[0].json() == answers[1].json()
    assert fast.get(f"/v1/channels/{channel.hex_id}").json()["acceptedCumulativeAmount"] == "40"


@pytest.mark.parametrize("microsecond", [0, 1, 999_999])
def test_a_receipt_body_is_the_documented_receipt(microsecond: int) -> None:
    """The voucher routes answer `receipt_body` through pydantic-core's `to_json`: exactly ReceiptOut's JSON, the
    time included (pydantic writes a whole second without a fraction, as `isoformat` does)."""
    at = datetime(2026, 12, 2, 9, 10, 26, microsecond, tzinfo=UTC)
    for reference, key in ((None, None), ("ordre n° 7 \u2028 \\", "pay-1:a.b_c")):
        receipt = Receipt(ChannelId("0x" + "ab" * 32), 10**30, 7, 0, at, reference, key)
        assert to_json(receipt_body(receipt)) == ReceiptOut.of(receipt).model_dump_json().encode()


def test_an_unexpected_failure_on_the_fast_path_is_a_500_and_the_service_goes_on(
    api: Callable[..., TestClient], channel: Channel, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = api()
    service = service_of(client)
    real = service.ingestor.ingest_async

    async def broken(_: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(service.ingestor, "ingest_async", broken)
    answer = client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10)))
    assert answer.status_code == 500
    assert answer.json() == {"code": "internal_error", "message": "internal error"}
    monkeypatch.setattr(service.ingestor, "ingest_async", real)
    assert client.post("/v1/vouchers", json=body(channel, 10, sign(channel.payer, channel.id, 10))).status_code == 201


def test_an_idempotency_key_makes_a_retry_the_same_payment_on_both_routes(
    api: Callable[..., TestClient], channel: Channel, sign: Sign
) -> None:
    """A client that lost the answer may retry from a position it re-read (the first voucher was accepted, so the
    position moved): the same key is the same payment, and nothing more is charged."""
    client = api()

    def voucher(cumulative: int, key: str) -> dict[str, Any]:
        return body(channel, cumulative, sign(channel.payer, channel.id, cumulative), idempotencyKey=key)

    first = client.post("/v1/vouchers", json=voucher(100, "pay-1"))
    assert first.status_code == 201
    assert first.json()["idempotencyKey"] == "pay-1"
    assert client.post("/v1/vouchers", json=voucher(100, "pay-1")).json() == first.json()  # the same voucher again
    retried = client.post("/v1/vouchers", json=voucher(200, "pay-1"))  # signed from the re-read position 100
    assert (retried.status_code, retried.json()) == (200, first.json())
    batch = client.post("/v1/vouchers/batch", json={"vouchers": [voucher(350, "pay-2"), voucher(600, "pay-2")]})
    assert [(r["status"], r["receipt"]["cumulativeAmount"]) for r in batch.json()["results"]] == [
        (201, "350"),
        (200, "350"),  # 250 more under pay-2, which paid 250: the same payment
    ]
    reused = client.post("/v1/vouchers", json=voucher(400, "pay-2"))  # 50 more: another amount under pay-2
    assert (reused.status_code, reused.json()["code"]) == (409, "idempotency_key_reused")
    payments = client.get(f"/v1/channels/{channel.hex_id}/payments").json()["items"]
    assert [(p["cumulativeAmount"], p["increment"], p["idempotencyKey"]) for p in payments] == [
        ("350", "250", "pay-2"),
        ("100", "100", "pay-1"),
    ]


def test_a_signature_of_the_wrong_length_is_named_as_such(
    api: Callable[..., TestClient], channel: Channel, sign: Sign
) -> None:
    """A 1-byte signature used to answer "does not recover to the payer", which sent people looking at keys."""
    answer = api().post("/v1/vouchers", json={**body(channel, 100, b"\x01")})
    assert (answer.status_code, answer.json()["code"]) == (400, "invalid_signature")
    assert answer.json()["message"] == "a voucher's signature is 65 bytes (r, s, v); this one has 1"
