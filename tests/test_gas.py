"""Gas regression: the marginal gas of one more settled channel may not grow by more than 1 % over the committed
figure (docs/gas.json, written by `make bench-gas`). A cheaper contract passes; commit the new figures with it."""

from __future__ import annotations

import json

from eth_account.signers.local import LocalAccount
from web3 import Web3

from scripts.bench import GasBench
from tests.hub_helpers import ROOT

GAS_JSON = ROOT / "docs" / "gas.json"
TOLERANCE = 1.01


def test_marginal_gas_per_settled_channel_has_not_grown(w3: Web3, accounts: list[LocalAccount]) -> None:
    committed = json.loads(GAS_JSON.read_text(encoding="utf-8"))
    bench = GasBench(w3, accounts)  # a hub and a token of its own; the snapshot fixture reverts them
    payer, payee = accounts[1], accounts[2].address
    channels = bench.open_token_channels(payer, [payee] * 100, 10**18)
    bench.settle_gas(payer, channels, 1)  # warm: every slot and the payee's balance already non-zero, as measured
    one = bench.settle_gas(payer, channels[:1], 2)
    hundred = bench.settle_gas(payer, channels, 3)
    marginal = (hundred - one) / 99
    limit = committed["settle_marginal_gas_per_channel"] * TOLERANCE
    assert marginal <= limit, (
        f"one more settled channel costs {marginal:.1f} gas, over {limit:.1f} "
        f"(docs/gas.json: {committed['settle_marginal_gas_per_channel']} + 1 %)"
    )
