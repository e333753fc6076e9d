"""Benchmarks that print figures: a readable table, then one JSON object as the last line.

python scripts/bench.py gas      # gas per ChannelHub operation and per settled channel, on a fresh anvil
                                 # (make bench-gas saves them to docs/gas.json; tests/test_gas.py holds us to it)
python scripts/bench.py verify   # voucher signature checks per second on one core
python scripts/bench.py ingest   # durable HTTP ingest on SQLite and PostgreSQL (scripts/bench_ingest.py)
python scripts/bench.py e2e      # voucher accepted -> credited on chain, through the simulator, per settle interval
python scripts/bench.py scale    # PostgreSQL with 100k channels and 10M vouchers (scripts/bench_scale.py)
python scripts/bench.py x402     # paid HTTP requests through x402's client and middleware and our facilitator
python scripts/bench.py flood    # an honest payer's latency under a flood of bogus vouchers (scripts/bench_flood.py)
python scripts/bench.py store    # the store's write path alone, 1-4 writers, bytes per payment (scripts/bench_store.py)
python scripts/bench.py journal  # the payer's journal alone: a payment's durable write (scripts/bench_journal.py)
python scripts/bench.py processes  # 1 and 8 server processes on one PostgreSQL, own and shared channels
                                   # (scripts/bench_processes.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from rich.console import Console
from rich.table import Table
from web3 import Web3
from web3.contract import Contract
from web3.types import RPCEndpoint, TxParams

from settlement.chain.batch_codec import SettleEntry, encode_batch
from settlement.chain.contracts import HUB, load_artifact
from settlement.chain.node import GAS_HEADROOM, access_list_plan, connect
from settlement.devtools.devnet import Devnet
from settlement.eip712.vouchers import Domain, VoucherVerifier, channel_id, recover_reference, sign_voucher
from settlement.server.config import Settings
from settlement.server.operator import devnet_accounts

ETH = "0x" + "00" * 20
CHALLENGE_PERIOD = 3600
BATCH_SIZES = (1, 10, 100, 500, 1000)


class GasBench:
    """Drives one hub on one devnet; every figure is `gasUsed` of a mined transaction (intrinsic gas included)."""

    def __init__(self, w3: Web3, accounts: list[LocalAccount]) -> None:
        self.w3 = w3
        self.accounts = accounts
        self.operator = accounts[0].address
        self.hub = self._deploy(HUB, CHALLENGE_PERIOD)
        self.token = self._deploy("DevToken", "Dev Token", "DEV", 18)
        chain_id = w3.eth.chain_id
        self.domain = Domain(chain_id=chain_id, verifying_contract=self.hub.address)
        self._salt = 0
        self.last_open_gas = 0

    def _deploy(self, name: str, *args: Any) -> Contract:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
        receipt = self._wait(factory.constructor(*args).transact({"from": self.operator}))
        contract: Contract = self.w3.eth.contract(address=receipt["contractAddress"], abi=artifact.abi)
        return contract

    def _wait(self, tx_hash: Any) -> Any:
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        if receipt["status"] != 1:
            raise SystemExit(f"benchmark transaction {tx_hash.hex()} reverted")
        return receipt

    def gas(self, call: Any, sender: str, value: int = 0) -> int:
        return int(self._wait(call.transact({"from": sender, "value": value}))["gasUsed"])

    def open_token_channels(
        self, payer: LocalAccount, payees: Sequence[str], amount: int
    ) -> list[tuple[bytes, bytes, str]]:
        """Open one channel per payee (sent without waiting, then all awaited): (channel id, salt, payee)."""
        total = amount * len(payees)
        self._wait(self.token.functions.mint(payer.address, total).transact({"from": payer.address}))
        self._wait(self.token.functions.approve(self.hub.address, total).transact({"from": payer.address}))
        channels, hashes = [], []
        for payee in payees:
            self._salt += 1
            salt = self._salt.to_bytes(32, "big")
            call = self.hub.functions.open(payee, self.token.address, salt, amount)
            hashes.append(call.transact({"from": payer.address, "gas": 200_000}))
            cid = channel_id(payer.address, payee, self.token.address, salt)
            channels.append((cid, salt, payee))
        for tx_hash in hashes:
            self.last_open_gas = int(self._wait(tx_hash)["gasUsed"])
        return channels

    def settle_gas(
        self, payer: LocalAccount, channels: list[tuple[bytes, bytes, str]], cumulative: int, *, plan: bool = True
    ) -> int:
        """One settleBatch over `channels`, grouped by payee and sent as the settlement engine sends it: with an
        access list when that is cheaper (`plan=False`: never)."""
        groups: dict[str, list[SettleEntry]] = {}
        for cid, salt, payee in channels:
            signature = sign_voucher(payer, self.domain, cid, cumulative)
            groups.setdefault(payee, []).append(SettleEntry(payer.address, salt, cumulative, signature))
        batch = encode_batch((payee, self.token.address, entries) for payee, entries in groups.items())
        tx: TxParams = {
            "from": self.operator,
            "to": self.hub.address,
            "data": self.hub.encode_abi("settleBatch", args=[batch]),
        }
        gas, access_list = access_list_plan(self.w3, tx) if plan else (self.w3.eth.estimate_gas(tx), None)
        tx["gas"] = int(gas * GAS_HEADROOM)
        if access_list:
            tx["accessList"] = access_list
        return int(self._wait(self.w3.eth.send_transaction(tx))["gasUsed"])


def run_gas(console: Console) -> dict[str, Any]:
    settings = Settings(_env_file=None, devnet_accounts=12)  # type: ignore[call-arg]
    with Devnet(settings) as net:
        w3 = connect(net.url)
        bench = GasBench(w3, net.accounts)
        payer, payee, other = net.accounts[1], net.accounts[2], net.accounts[3]
        figures: dict[str, Any] = {}

        # single operations, ETH channel
        salt = (10**9).to_bytes(32, "big")
        figures["open_eth_gas"] = bench.gas(
            bench.hub.functions.open(payee.address, ETH, salt, 10**18), payer.address, 10**18
        )
        cid = channel_id(payer.address, payee.address, ETH, salt)
        figures["top_up_eth_gas"] = bench.gas(bench.hub.functions.topUp(cid, 10**17), payer.address, 10**17)
        first = SettleEntry(payer.address, salt, 10**16, sign_voucher(payer, bench.domain, cid, 10**16))
        batch1 = encode_batch([(payee.address, ETH, [first])])
        figures["settle_batch_1_first_gas"] = bench.gas(bench.hub.functions.settleBatch(batch1), bench.operator)
        figures["request_close_gas"] = bench.gas(bench.hub.functions.requestClose(cid), payer.address)
        w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [CHALLENGE_PERIOD + 1])
        w3.provider.make_request(RPCEndpoint("evm_mine"), [])
        figures["finalize_close_gas"] = bench.gas(bench.hub.functions.finalizeClose(cid), payer.address)
        figures["withdraw_eth_gas"] = bench.gas(bench.hub.functions.withdraw(ETH, 10**16, payee.address), payee.address)
        token_channel = bench.open_token_channels(payer, [payee.address], 10**18)
        figures["open_token_gas"] = bench.last_open_gas

        # settlement at scale: one payee, channels already settled once (non-zero slots), payee balance non-zero
        sizes: dict[int, int] = {}
        max_size = max(BATCH_SIZES)
        channels = bench.open_token_channels(payer, [payee.address] * max_size, 10**18) + token_channel
        bench.settle_gas(payer, channels, 1)  # first settlement: slots and the payee balance become non-zero
        for round_no, size in enumerate(BATCH_SIZES, start=2):
            sizes[size] = bench.settle_gas(payer, channels[:size], round_no)
        for size, gas in sizes.items():
            figures[f"settle_batch_{size}_gas"] = gas
        figures["settle_batch_1_gas"] = sizes[1]
        figures["settle_marginal_gas_per_channel"] = round((sizes[100] - sizes[1]) / 99, 1)
        round_no = len(BATCH_SIZES) + 2
        plain_1 = bench.settle_gas(payer, channels[:1], round_no, plan=False)
        plain_100 = bench.settle_gas(payer, channels[:100], round_no + 1, plan=False)
        figures["settle_marginal_gas_per_channel_without_access_list"] = round((plain_100 - plain_1) / 99, 1)

        # the same with 100 distinct payees (each already credited once): one balance write per payee
        payees = [Web3.to_checksum_address(keccak(i.to_bytes(32, "big"))[-20:]) for i in range(1, 101)]
        spread = bench.open_token_channels(other, payees, 10**18)
        bench.settle_gas(other, spread, 1)
        one = bench.settle_gas(other, spread[:1], 2)
        hundred = bench.settle_gas(other, spread, 3)
        figures["settle_marginal_gas_per_channel_distinct_payees"] = round((hundred - one) / 99, 1)

        # 1,000 vouchers per channel, one settlement: the cost a single micro-payment carries
        figures["gas_per_payment_at_1000"] = round(sizes[1000] / (1000 * 1000), 2)
        figures["withdraw_token_gas"] = bench.gas(
            bench.hub.functions.withdraw(bench.token.address, 10, payee.address), payee.address
        )
        # the naive alternative: one ERC-20 transfer per payment, between two addresses that already hold tokens
        bench.gas(bench.token.functions.mint(payer.address, 10**18), payer.address)
        figures["baseline_transfer_gas"] = bench.gas(bench.token.functions.transfer(payee.address, 1), payer.address)
        figures["ratio_vs_transfer"] = round(figures["baseline_transfer_gas"] / figures["gas_per_payment_at_1000"], 1)

    table = Table(title="ChannelHub gas (gasUsed, intrinsic 21,000 included)")
    table.add_column("operation")
    table.add_column("gas", justify="right")
    for key, value in figures.items():
        table.add_row(key, f"{value:,}")
    console.print(table)
    figures["target_settle_marginal_gas_per_channel"] = 11_000
    figures["meets_target"] = figures["settle_marginal_gas_per_channel"] <= 11_000
    return figures


def run_verify(console: Console) -> dict[str, Any]:
    """Single-threaded, so the rate is per core; every voucher is distinct (no cache can help)."""
    payers = devnet_accounts(Settings(_env_file=None).devnet_mnemonic, 20)  # type: ignore[call-arg]
    domain = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
    vouchers = []
    for i in range(4000):
        payer = payers[i % len(payers)]
        cid = keccak(i.to_bytes(32, "big"))
        amount = 10**12 + i * 7919
        vouchers.append((cid, amount, sign_voucher(payer, domain, cid, amount), bytes.fromhex(payer.address[2:])))
    verifier = VoucherVerifier(domain)
    rounds = 5
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for cid, amount, sig, signer in vouchers:
            if verifier.recover(cid, amount, sig) != signer:
                raise SystemExit("fast path recovered the wrong signer")
        rates.append(len(vouchers) / (time.perf_counter() - start))
    fast = max(rates)  # like timeit: the best round is the code's speed, slower rounds measure the machine's noise
    sample = vouchers[:1000]
    start = time.perf_counter()
    for cid, amount, sig, signer in sample:
        if recover_reference(domain, cid, amount, sig).lower() != "0x" + signer.hex():
            raise SystemExit("reference path recovered the wrong signer")
    reference = len(sample) / (time.perf_counter() - start)
    table = Table(title="voucher verification, one core")
    table.add_column("path")
    table.add_column("vouchers/s", justify="right")
    table.add_column("µs each", justify="right")
    table.add_row("fast (coincurve, precomputed domain)", f"{fast:,.0f}", f"{1e6 / fast:.1f}")
    table.add_row("reference (eth-account)", f"{reference:,.0f}", f"{1e6 / reference:.1f}")
    console.print(table)
    return {
        "verify_per_s": round(fast),
        "verify_per_s_mean": round(statistics.mean(rates)),
        "eth_account_verify_per_s": round(reference),
        "speedup": round(fast / reference, 1),
        "vouchers": rounds * len(vouchers),
        "target_verify_per_s": 20_000,
        "meets_target": fast >= 20_000,
    }


def run_ingest(console: Console) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: make `scripts` importable
    from scripts.bench_ingest import run_ingest as ingest

    return ingest(console)


E2E_SETTLE_INTERVALS = (2.0, 10.0)
E2E_BLOCK_TIME = 1  # seconds: anvil mines on a timer, like a real chain, instead of on every transaction
E2E_SECONDS = 40.0
E2E_RATE = 100.0


def run_e2e(console: Console) -> dict[str, Any]:
    """The simulator (real service, engine, devnet with 1 s blocks) at 100 payments/s for 40 s, once per settle
    interval; each payment's latency runs from its receipt to the moment a settlement covering it is seen on chain."""
    from settlement.devtools.simulate import Plan, Simulation

    table = Table(title=f"accepted -> credited on chain ({E2E_BLOCK_TIME}s blocks, {E2E_RATE:g} payments/s)")
    for column in ("settle interval", "payments", "batches", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right")
    figures: dict[str, Any] = {"block_time_s": E2E_BLOCK_TIME, "rate_per_s": E2E_RATE, "seconds": E2E_SECONDS}
    quiet = Console(quiet=True)
    for interval in E2E_SETTLE_INTERVALS:
        settings = Settings(_env_file=None, devnet_block_time=E2E_BLOCK_TIME, confirmations=0)  # type: ignore[call-arg]
        plan = Plan(payers=4, payees=2, rate=E2E_RATE, count=None, duration=E2E_SECONDS, settle_interval=interval)
        with console.status(f"settle interval {interval:g}s: paying for {E2E_SECONDS:g}s…"):
            outcome = Simulation(plan, settings, quiet).run()
        if outcome.mismatches or outcome.refused or len(outcome.e2e_seconds) != outcome.payments:
            raise SystemExit(f"the simulation at {interval:g}s did not settle every payment: {outcome}")
        p50, p99, worst = (outcome.e2e_ms(q) or 0.0 for q in (0.5, 0.99, 1.0))
        cells = (f"{outcome.payments:,}", str(outcome.batches), f"{p50:,.0f}", f"{p99:,.0f}", f"{worst:,.0f}")
        table.add_row(f"{interval:g} s", *cells)
        key = f"{interval:g}s"
        figures[f"e2e_ms_p50_at_{key}"] = round(p50)
        figures[f"e2e_ms_p99_at_{key}"] = round(p99)
        figures[f"payments_at_{key}"] = outcome.payments
        figures[f"batches_at_{key}"] = outcome.batches
    console.print(table)
    return figures


def run_x402(console: Console) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.bench_x402 import run_x402 as x402

    return x402(console)


def run_flood(console: Console) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.bench_flood import run_flood as flood

    return flood(console)


def run_store(console: Console) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.bench_store import run_store as store

    return store(console)


def run_journal(console: Console) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.bench_journal import run_journal as journal

    return journal(console)


def run_processes(console: Console) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.bench_processes import run_processes as processes

    return processes(console)


SCALE = {"channels": 100_000, "vouchers": 10_000_000}


def run_scale(console: Console) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.bench_scale import run_scale as scale

    return scale(console, **SCALE)


BENCHES: dict[str, Callable[[Console], dict[str, Any]]] = {
    "gas": run_gas,
    "verify": run_verify,
    "ingest": run_ingest,
    "e2e": run_e2e,
    "scale": run_scale,
    "x402": run_x402,
    "flood": run_flood,
    "store": run_store,
    "journal": run_journal,
    "processes": run_processes,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("--channels", type=int, default=SCALE["channels"], help="scale: channels (100,000)")
    parser.add_argument("--vouchers", type=int, default=SCALE["vouchers"], help="scale: vouchers (10,000,000)")
    parser.add_argument("--save", type=Path, help="also write the JSON figures to this file (bench-gas: docs/gas.json)")
    args = parser.parse_args(argv)
    SCALE.update(channels=args.channels, vouchers=args.vouchers)
    console = Console(stderr=False)
    figures = BENCHES[args.name](console)
    line = json.dumps({"bench": args.name, **figures}, sort_keys=False)
    print(line)
    if args.save is not None:
        args.save.write_text(line + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
