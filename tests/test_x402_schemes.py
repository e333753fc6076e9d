"""The payee's and the payer's `channelhub` plug-ins on their own: prices, requirements, and what a payer refuses
to pay (another hub, another chain, a malformed price)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from x402.schemas import AssetAmount, PaymentRequirements, SupportedKind

from settlement.devtools.devnet import Devnet
from settlement.errors import BudgetExceededError, TransactionFailedError, UntrustedServiceError
from settlement.sdk.payer import PayerClient
from settlement.x402 import wire
from settlement.x402.client import ChannelHubClientScheme, DepositPolicy
from settlement.x402.server import ChannelHubServerScheme
from settlement.x402.wire import VoucherPayload, chain_id_of
from tests.hub_helpers import ETH, Tampering
from tests.servers import ServiceProcess

NETWORK = "eip155:31337"


@pytest.mark.parametrize(
    ("price", "base_units"),
    [
        (1, 1),
        ("25000000000", 25_000_000_000),
        ("0.001", 10**15),
        ("1.5", 15 * 10**17),
        (10**30, 10**30),
        (".5", 5 * 10**17),
        ("2.", 2 * 10**18),
        ("1.000000000000000000000", 10**18),
        ("12345678901.123456789012345678", 12_345_678_901_123_456_789_012_345_678),  # Decimal: ...345680
    ],
)
def test_prices_are_base_units_or_human_amounts_of_the_asset(price: int | str, base_units: int) -> None:
    scheme = ChannelHubServerScheme()
    assert scheme.parse_price(price, NETWORK) == AssetAmount(amount=str(base_units), asset=ETH)


@pytest.mark.parametrize(
    "price",
    [
        "$0.01",
        0,
        -5,
        "0",
        "0.0000000000000000001",
        "abc",
        0.5,
        True,
        "1e3",
        "1.0000000000000000000000000000001",  # Decimal's 28 digits took it for 10^18
        "1_000",
        "+5",
        "\u0661\u0662\u0663",  # Arabic-Indic digits, which int() reads
        ".",
        "007",
        "9" * 5000,
        2**256,
    ],
    ids=lambda price: repr(price)[:40],
)
def test_a_price_that_is_not_whole_base_units_is_refused(price: object) -> None:
    with pytest.raises(ValueError):
        ChannelHubServerScheme().parse_price(price, NETWORK)  # type: ignore[arg-type]


def test_requirements_carry_the_hub_the_domain_and_a_deposit_hint() -> None:
    scheme = ChannelHubServerScheme(deposit_multiple=50)
    base = PaymentRequirements(
        scheme="channelhub", network=NETWORK, asset=ETH, amount="7", pay_to="0x" + "11" * 20, max_timeout_seconds=60
    )
    kind = SupportedKind(x402_version=2, scheme="channelhub", network=NETWORK, extra={"hub": "0xabc", "name": "N"})
    enhanced = scheme.enhance_payment_requirements(base, kind, [])
    assert enhanced.extra == {"hub": "0xabc", "name": "N", "minDeposit": "350"}
    named = ChannelHubServerScheme(facilitator_url="http://127.0.0.1:8000/x402").enhance_payment_requirements(
        base, kind, []
    )
    assert named.extra == {
        "hub": "0xabc",
        "name": "N",
        "minDeposit": "7000",
        "facilitator": "http://127.0.0.1:8000/x402",
    }


def test_networks_and_payloads_have_one_form() -> None:
    assert [chain_id_of(n) for n in ("eip155:1", "eip155:31337", "eip155:01", "solana:1", "eip155:")] == [
        1, 31337, None, None, None,
    ]  # fmt: skip
    # Digits to str.isdigit that int() refuses, or reads as another form of a number, or cannot read at all: none.
    for bad in ("eip155:\u00b2", "eip155:\u0661", "eip155:1\n", "eip155: 1", "eip155:+1", "eip155:" + "9" * 5000):
        assert chain_id_of(bad) is None, bad
    assert chain_id_of("eip155:" + "9" * 32) == 10**32 - 1  # CAIP-2's longest reference
    good = {"channelId": "0x" + "ab" * 32, "cumulativeAmount": "5", "signature": "0x" + "cd" * 65}
    assert VoucherPayload.parse(good).to_dict() == good
    bads: list[Any] = [{**good, "cumulativeAmount": "05"}, {**good, "cumulativeAmount": 5}, {**good, "x": 1}, [good]]
    for bad in bads:
        with pytest.raises(ValueError):
            VoucherPayload.parse(bad)


def test_amounts_from_a_payee_or_a_facilitator_have_one_form() -> None:
    """A price, a deposit hint, a facilitator's position: plain decimals in (0, 2^256) or nothing (a hint that is not
    is no hint); never `int()` of whatever text came ("²" and "١٢٣" are digits to str.isdigit)."""
    assert [wire.base_units(v) for v in ("1", "1000", str(2**256 - 1))] == [1, 1000, 2**256 - 1]
    for bad in ("0", "007", "-5", "+5", " 7", "7 ", "1e30", "1.0", "²", "١٢٣", "1" * 79, str(2**256), "", 5, None, [1]):
        assert wire.base_units(bad) is None, bad


def test_addresses_compared_on_the_wire_hold_to_their_checksum() -> None:
    """`same_address` said a mixed-case address must carry its checksum, and took any (eth_utils' `is_address` does
    not check it): a payee's `payTo` pasted with one character wrong matched the address its typo spells."""
    payee = "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65"
    typo = payee[:-1] + "6"
    assert [wire.same_address(payee, payee.lower()), wire.same_address(payee.lower(), "0x" + payee[2:].upper())] == [
        True, True,
    ]  # fmt: skip
    assert [wire.same_address(typo, typo.lower()), wire.same_address(typo.lower(), typo)] == [False, False]


def test_deposit_policy() -> None:
    assert DepositPolicy(multiple=10).amount(7, None) == 70
    assert DepositPolicy(multiple=10).amount(7, 1000) == 1000  # the payee's hint
    assert DepositPolicy(multiple=10, follow_hint=False).amount(7, 1000) == 70
    assert DepositPolicy(multiple=10, maximum=50).amount(7, 1000) == 50  # the payer's cap wins
    with pytest.raises(ValueError, match="cannot cover one payment"):
        DepositPolicy(maximum=5).amount(7, None)


def test_a_payees_deposit_hint_is_followed_only_up_to_the_payers_limit() -> None:
    """A hostile payee's hint (its price 1 wei, its hint a whole wallet) locks 1,000 prices by default, not the wallet;
    an honest payee's default hint (1,000 prices) is followed in full."""
    assert DepositPolicy().amount(1, 10**24) == 1_000
    assert DepositPolicy().amount(7, 7_000) == 7_000
    assert DepositPolicy().amount(7, 6_999) == 6_999
    assert DepositPolicy(hint_limit=2_000).amount(7, 10**24) == 14_000
    assert DepositPolicy(hint_limit=None).amount(7, 10**24) == 10**24  # a payer that trusts its payees' hints
    assert DepositPolicy(multiple=5_000).amount(7, 10**24) == 35_000  # the payer's own multiple is not the hint's
    for bad in ({"multiple": 0}, {"hint_limit": 0}, {"hint_limit": -1}):
        with pytest.raises(ValueError, match="at least 1"):
            DepositPolicy(**bad)  # type: ignore[arg-type]


def test_a_payers_bounds_on_channels_its_payees_stopped_are_checked(
    spawn: Callable[..., ServiceProcess], devnet: Devnet, accounts: list[LocalAccount], tmp_path: Path
) -> None:
    """No channel could ever be opened with `max_stopped` 0, and a negative grace is not a time; nor is a wait for
    the service to count a deposit of no time at all."""
    service = spawn(f"sqlite:///{tmp_path / 'bounds.db'}")
    payer = PayerClient(HexBytes(accounts[12].key).to_0x_hex(), devnet.url, service.url, state_path=tmp_path / "j")
    try:
        for bad in ({"max_stopped": 0}, {"max_stopped": -1}, {"stopped_grace": -1.0}):
            with pytest.raises(ValueError, match="max_stopped is at least 1 channel"):
                ChannelHubClientScheme(payer, **bad)
        assert ChannelHubClientScheme(payer, max_stopped=1, stopped_grace=0).max_stopped == 1
        for wait in (0.0, -1.0):
            with pytest.raises(ValueError, match="confirm_timeout is a time in seconds, more than 0"):
                ChannelHubClientScheme(payer, confirm_timeout=wait)
        assert ChannelHubClientScheme(payer, confirm_timeout=0.5).confirm_timeout == 0.5
    finally:
        payer.shutdown()


def test_a_payee_naming_a_new_pay_to_at_each_request_opens_at_most_max_opens_channels(
    spawn: Callable[..., ServiceProcess], devnet: Devnet, w3: Web3, accounts: list[LocalAccount], tmp_path: Path
) -> None:
    """A hostile payee (or one whose key rotates) names a new `payTo` in each 402. Each was a payee of its own: a
    channel opened per request, a deposit locked and an open's gas each, within any budget (budgets count payments,
    one price each; `max_lanes` counts lanes per payee). At most `max_opens` channels are opened in any rolling
    `opens_period` (an hour; the scheme's clock here), all payees together; past it, `BudgetExceededError` before
    anything is sent or signed."""
    service = spawn(f"sqlite:///{tmp_path / 'opens.db'}")
    payer = PayerClient(HexBytes(accounts[12].key).to_0x_hex(), devnet.url, service.url, state_path=tmp_path / "j")
    now = [1000.0]
    scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=2), max_opens=3, clock=lambda: now[0])
    payees = [Account.create().address for _ in range(5)]

    def requirements(payee: str) -> PaymentRequirements:
        return PaymentRequirements(
            scheme="channelhub",
            network=f"eip155:{devnet.chain_id}",
            asset=ETH,
            amount="10",
            pay_to=payee,
            max_timeout_seconds=60,
            extra={"hub": payer.hub.address},
        )

    def pay(payee: str) -> dict[str, Any]:
        return scheme.create_payment_payload(requirements(payee))

    try:
        for payee in payees[:3]:
            assert pay(payee)["cumulativeAmount"] == "10"
            now[0] += 600  # ten minutes apart
        nonce = w3.eth.get_transaction_count(accounts[12].address)
        with pytest.raises(BudgetExceededError) as refused:  # the code before: a fourth channel opened
            pay(payees[3])
        assert refused.value.message == (
            f"this payer opened 3 channels in the last 3600s, its max_opens: no channel is opened to {payees[3]} (a "
            "payee naming a new payTo at each request?)"
        )
        assert refused.value.details == {"retryAfter": 1800}  # when the oldest open leaves the window
        # Counted in the payer's journal: the app restarted (a new client on its file), or a second app of the key
        # beside it, is refused too. Counted in memory before, each started a fresh window.
        restarted = PayerClient(
            HexBytes(accounts[12].key).to_0x_hex(), devnet.url, service.url, state_path=tmp_path / "j"
        )
        try:
            again = ChannelHubClientScheme(restarted, DepositPolicy(multiple=2), max_opens=3, clock=lambda: now[0])
            with pytest.raises(BudgetExceededError) as refused_again:  # the code before: a fourth channel opened
                again.create_payment_payload(requirements(payees[3]))
            assert (refused_again.value.message, refused_again.value.details) == (
                refused.value.message,
                {"retryAfter": 1800},
            )
        finally:
            restarted.shutdown()
        assert payer.open_channels(payees[3]) == [] and w3.eth.get_transaction_count(accounts[12].address) == nonce
        now[0] += 1799
        strangers = [Account.create().address for _ in range(20)]
        for payee in [payees[3], *strangers]:  # one refused payee a request: none is kept (it grew the client's maps)
            with pytest.raises(BudgetExceededError):
                pay(payee)
        turned_away = {payees[3], *strangers}
        held = (scheme._lanes, scheme._opening, scheme._stopped, scheme._unsure)
        assert [[party.payee for party in kept if party.payee in turned_away] for kept in held] == [[], [], [], []]
        assert sorted(party.payee for party in scheme._lanes) == sorted(payees[:3])
        now[0] += 1  # the window rolls on: the oldest open leaves it
        assert pay(payees[4])["cumulativeAmount"] == "10"
    finally:
        payer.shutdown()
    with pytest.raises(ValueError, match="max_opens is at least 1 channel"):
        ChannelHubClientScheme(payer, max_opens=0)
    with pytest.raises(ValueError, match="opens_period more than 0 seconds"):
        ChannelHubClientScheme(payer, opens_period=0)


def test_two_apps_of_one_key_racing_for_the_last_open_open_one_channel(
    spawn: Callable[..., ServiceProcess],
    devnet: Devnet,
    w3: Web3,
    accounts: list[LocalAccount],
    tmp_path: Path,
    mining: str,
) -> None:
    """Two apps of one payer key on one journal, `max_opens=1`, each paying a new payee at the same moment: one
    channel opened, the other payment refused before anything is sent (the count and the claim are one transaction
    of the shared file), on automine and on a chain that mines every second."""
    service = spawn(f"sqlite:///{tmp_path / 'race.db'}")
    key = HexBytes(accounts[14].key).to_0x_hex()
    payers = [PayerClient(key, devnet.url, service.url, state_path=tmp_path / "shared-journal") for _ in range(2)]
    payees = [Account.create().address for _ in range(2)]
    start = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def pay(n: int) -> None:
        scheme = ChannelHubClientScheme(payers[n], DepositPolicy(multiple=2), max_opens=1)
        requirements = PaymentRequirements(
            scheme="channelhub",
            network=f"eip155:{devnet.chain_id}",
            asset=ETH,
            amount="10",
            pay_to=payees[n],
            max_timeout_seconds=60,
            extra={"hub": payers[n].hub.address},
        )
        start.wait()
        try:
            outcomes[n] = scheme.create_payment_payload(requirements)["cumulativeAmount"]
        except BudgetExceededError as ex:
            outcomes[n] = ex.code

    nonce = w3.eth.get_transaction_count(accounts[14].address)
    try:
        threads = [threading.Thread(target=pay, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(outcomes.values()) == ["10", "budget_exceeded"]
        opened = [n for n, outcome in outcomes.items() if outcome == "10"]
        assert [len(payers[0].open_channels(payee)) for payee in payees] == [1 if n in opened else 0 for n in range(2)]
        assert w3.eth.get_transaction_count(accounts[14].address) == nonce + 1  # one open sent, nothing else
    finally:
        for payer in payers:
            payer.shutdown()


def test_an_open_the_chain_never_took_is_not_counted_against_max_opens(
    spawn: Callable[..., ServiceProcess], devnet: Devnet, accounts: list[LocalAccount], tmp_path: Path
) -> None:
    """An open refused before the node took it (a deposit beyond the wallet) gives its place in the window back: the
    window is counted before the open is sent, and a payer whose opens failed must not be locked out for an hour."""
    service = spawn(f"sqlite:///{tmp_path / 'opens.db'}")
    payer = PayerClient(HexBytes(accounts[13].key).to_0x_hex(), devnet.url, service.url, state_path=tmp_path / "j")
    requirements = PaymentRequirements(
        scheme="channelhub",
        network=f"eip155:{devnet.chain_id}",
        asset=ETH,
        amount="10",
        pay_to=Account.create().address,
        max_timeout_seconds=60,
        extra={"hub": payer.hub.address},
    )
    try:
        beyond = ChannelHubClientScheme(payer, DepositPolicy(multiple=10**24), max_opens=1)  # 10**25 wei
        with pytest.raises(TransactionFailedError, match=r"Insufficient funds for gas \* price \+ value"):
            beyond.create_payment_payload(requirements)
        scheme = ChannelHubClientScheme(payer, DepositPolicy(multiple=2), max_opens=1)
        assert scheme.create_payment_payload(requirements)["cumulativeAmount"] == "10"
    finally:
        payer.shutdown()


@pytest.mark.parametrize(
    "change", ["another hub", "no hub", "another chain", "another scheme", "price not a number", "payTo with a typo"]
)
def test_a_payer_refuses_requirements_it_cannot_trust(
    change: str, spawn: Callable[..., ServiceProcess], devnet: Devnet, accounts: list[LocalAccount], tmp_path: Path
) -> None:
    service = spawn(f"sqlite:///{tmp_path / 'refuse.db'}")
    payer = PayerClient(HexBytes(accounts[12].key).to_0x_hex(), devnet.url, service.url, state_path=tmp_path / "j")
    scheme = ChannelHubClientScheme(payer)
    fields: dict[str, Any] = {
        "scheme": "channelhub",
        "network": f"eip155:{devnet.chain_id}",
        "asset": ETH,
        "amount": "10",
        "pay_to": accounts[13].address,
        "max_timeout_seconds": 60,
        "extra": {"hub": payer.hub.address},
    }
    changes: dict[str, dict[str, Any]] = {
        "another hub": {"extra": {"hub": "0x" + "22" * 20}},
        "no hub": {"extra": {}},
        "another chain": {"network": "eip155:1"},
        "another scheme": {"scheme": "exact"},
        "price not a number": {"amount": "ten"},
        # One character wrong in the payee's configured address (its EIP-55 checksum broken): a deposit for no one.
        "payTo with a typo": {"pay_to": accounts[13].address[:-1] + ("0" if accounts[13].address[-1] != "0" else "1")},
    }
    fields |= changes[change]
    with pytest.raises(ValueError):
        scheme.create_payment_payload(PaymentRequirements(**fields))
    assert payer.open_channels(accounts[13].address) == []  # nothing was opened, nothing signed
    assert payer.open_channels(fields["pay_to"].lower()) == []
    payer.shutdown()


def test_a_listed_channel_to_another_payee_is_never_paid_on(
    spawn: Callable[..., ServiceProcess], devnet: Devnet, accounts: list[LocalAccount], tmp_path: Path
) -> None:
    """A payer's client that restarts finds its channels to a payee through the service's listing. A listing that
    named the payer's channel to someone else (a service colluding with that payee) had x402's client sign its
    payments to this payee on that channel: vouchers the other payee could settle. Each listed channel is now checked
    on the hub to be this payer's, to this payee, in this asset, before a lane is made of it."""
    service = spawn(f"sqlite:///{tmp_path / 'listed.db'}")
    tamper = Tampering()
    http = httpx.Client(base_url=service.url, transport=tamper)
    key = HexBytes(accounts[12].key).to_0x_hex()
    payer = PayerClient(key, devnet.url, service.url, state_path=tmp_path / "j", http=http)
    elsewhere = payer.open_channel(accounts[14].address, 1_000)
    payer.wait_until_known(elsewhere)
    (listed,) = payer.open_channels(accounts[14].address)
    tamper.rewrite = lambda path, data: {"items": [listed]} if path == "/v1/channels" else data
    requirements = PaymentRequirements(
        scheme="channelhub",
        network=f"eip155:{devnet.chain_id}",
        asset=ETH,
        amount="10",
        pay_to=accounts[13].address,
        max_timeout_seconds=60,
        extra={"hub": payer.hub.address},
    )
    with pytest.raises(UntrustedServiceError, match=f"the hub says it pays {accounts[14].address}"):
        ChannelHubClientScheme(payer).create_payment_payload(requirements)
    assert payer.position(elsewhere) == 0  # nothing signed on it
    tamper.rewrite = None
    assert payer.open_channels(accounts[13].address) == []  # and nothing opened to the payee asked for
    payer.shutdown()
