"""`bench.py scale`: does the cost of ingesting and settling grow with the size of the PostgreSQL store?

CHANNELS channels are opened on a devnet (blocks of many transactions: automine off, a large block gas limit), then
VOUCHERS vouchers are ingested in rounds, one voucher per channel per round (cumulative = round number), through the
service's real ingest path in process: signature recovery, the ledger rules, the group commit on PostgreSQL. HTTP is
left out on purpose: `bench.py ingest` measures it, and it costs the same whatever the store holds. Vouchers are
signed by a separate process (coincurve) while the previous round is ingested, one round ahead at most (so it does not
sign on during a settlement and skew its timing).

At 10 %, 50 % and 100 % of the vouchers the ingest rate of the last round is noted, then the settlement engine
settles every channel (batches of up to 400 on the devnet) and the wall time per settled channel is noted.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from coincurve import PrivateKey
from rich.console import Console
from rich.table import Table

from scripts.bench_ingest import POSTGRES_URL, _postgres_available, scratch_postgres
from settlement.chain.deployment import deploy_hub
from settlement.chain.node import connect
from settlement.devtools.devnet import Devnet
from settlement.domain.model import ChannelId, Voucher
from settlement.eip712.vouchers import Domain, VoucherVerifier, channel_id, read_domain
from settlement.server.config import Settings
from settlement.server.operator import operator_account
from settlement.server.service import Service
from settlement.settle.engine import Settler
from settlement.store import settlements as batch_q

ETH = "0x" + "00" * 20
PAYERS = 100
LEVELS = (0.1, 0.5, 1.0)
INGEST_CHUNK = 1_000
INGEST_THREADS = 4  # callers overlap signature recovery with the writer's group commits
OPEN_CHUNK = 500
# anvil clones the whole state for every block it keeps; at 100k channels that is tens of MB a block, and with its
# default history it held 6.4 GB (256 kept: 9 GB) and slowed batch after batch. Nothing here reads old states.
DEVNET_KEEP_STATES = 8


def run_scale(console: Console, channels: int = 100_000, vouchers: int = 10_000_000) -> dict[str, Any]:
    if not _postgres_available():
        raise SystemExit(f"bench scale needs PostgreSQL at {POSTGRES_URL}")
    rounds = max(vouchers // channels, 1)
    checkpoints = sorted({max(round(rounds * level), 1) for level in LEVELS})
    keep = DEVNET_KEEP_STATES
    settings = Settings(_env_file=None, devnet_accounts=PAYERS + 2, devnet_keep_states=keep)  # type: ignore[call-arg]
    figures: dict[str, Any] = {"channels": channels, "vouchers": rounds * channels, "store": "postgresql"}
    rows = []
    with (
        Devnet(settings) as net,
        tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp,
        scratch_postgres(f"bench_scale_{uuid.uuid4().hex[:10]}") as db_url,
    ):
        w3 = connect(net.url, 120)
        operator, payee = net.accounts[0], net.accounts[-1].address
        deployment = deploy_hub(w3, operator, 3600)
        deployment.save(Path(tmp) / "deployment.json")
        payers = net.accounts[1 : 1 + PAYERS]
        started = time.monotonic()
        with console.status(f"opening {channels:,} channels…"):
            ids = _open_channels(net.url, deployment.address, [str(p.address) for p in payers], payee, channels)
        console.print(f"{channels:,} channels open in {time.monotonic() - started:.0f}s")
        service_settings = settings.model_copy(
            update={
                "rpc_url": net.url,
                "rpc_timeout": 120.0,
                "deployment_file": Path(tmp) / "deployment.json",
                "database_url": db_url,
                "confirmations": 0,
                "engine_enabled": False,  # this bench ticks the settler itself, when it wants a settlement
                "private_key": None,  # the devnet's first account (the operator) settles
                "settle_interval": 10**6,  # settled only when this bench asks
                "indexer_batch_blocks": 10,
            }
        )
        service = Service.build(service_settings)
        settler = Settler(
            service.db,
            service.w3,
            service.hub,
            operator_account(service_settings, service.w3),
            service_settings,
            service.metrics,
        )
        service.start()
        try:
            with console.status("indexing the channels…"):
                service.indexer.catch_up()
            domain = read_domain(service.hub)
            keys = {str(p.address): bytes(p.key) for p in payers}
            owners = [(cid, keys[payer]) for cid, payer in ids]
            ingested = 0
            with multiprocessing.get_context("spawn").Pool(1) as pool, ThreadPoolExecutor(INGEST_THREADS) as ingest:
                signing = pool.apply_async(_sign_round, ((domain, owners, 1),))
                for round_no in range(1, rounds + 1):
                    batch = signing.get()
                    if round_no < rounds and round_no not in checkpoints:
                        signing = pool.apply_async(_sign_round, ((domain, owners, round_no + 1),))
                    began = time.monotonic()
                    chunks = [batch[i : i + INGEST_CHUNK] for i in range(0, len(batch), INGEST_CHUNK)]
                    for outcomes in ingest.map(service.ingestor.ingest, chunks):
                        failed = [o for o in outcomes if isinstance(o, Exception)]
                        if failed:
                            raise SystemExit(f"round {round_no}: {len(failed)} refused, e.g. {failed[0]}")
                    rate = len(batch) / (time.monotonic() - began)
                    ingested += len(batch)
                    console.print(f"round {round_no}/{rounds}: {ingested:,} vouchers, {rate:,.0f}/s")
                    if round_no in checkpoints:
                        level = f"{round(100 * round_no / rounds)}pct"
                        settle_ms = _settle_all(settler, service, console)
                        figures[f"ingest_per_s_at_{level}"] = round(rate)
                        figures[f"settle_ms_per_channel_at_{level}"] = round(settle_ms, 2)
                        rows.append((level, ingested, rate, settle_ms))
                        if round_no < rounds:
                            signing = pool.apply_async(_sign_round, ((domain, owners, round_no + 1),))
        finally:
            service.stop()
    table = Table(title=f"PostgreSQL store at scale: {channels:,} channels")
    for column in ("load", "vouchers in store", "ingest vouchers/s", "settle ms/channel"):
        table.add_column(column, justify="right")
    for level, count, rate, settle_ms in rows:
        table.add_row(level.replace("pct", " %"), f"{count:,}", f"{rate:,.0f}", f"{settle_ms:.2f}")
    console.print(table)
    return figures


def _sign_round(job: tuple[Domain, list[tuple[bytes, bytes]], int]) -> list[Voucher]:
    """Every channel's voucher for cumulative = `amount` (runs in the signer process)."""
    domain, owners, amount = job
    verifier = VoucherVerifier(domain)
    out = []
    for cid, key in owners:
        raw = PrivateKey(key).sign_recoverable(verifier.digest(cid, amount), hasher=None)
        out.append(Voucher(ChannelId("0x" + cid.hex()), amount, raw[:64] + bytes((raw[64] + 27,))))
    return out


def _open_channels(rpc_url: str, hub: str, payers: list[str], payee: str, count: int) -> list[tuple[bytes, str]]:
    """Open `count` 1-ETH channels from anvil's unlocked payers, hundreds per block; returns (id, payer) pairs."""
    from eth_abi.abi import encode
    from eth_utils.crypto import keccak

    selector = keccak(text="open(address,address,bytes32,uint256)")[:4]
    deposit = 10**15
    with httpx.Client(timeout=300) as http:

        def rpc(calls: list[tuple[str, list[Any]]]) -> list[Any]:
            body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
            answers = sorted(http.post(rpc_url, json=body).json(), key=lambda a: a["id"])
            for answer in answers:
                if "error" in answer:
                    raise SystemExit(f"devnet refused: {answer['error']}")
            return [a["result"] for a in answers]

        rpc([("evm_setAutomine", [False]), ("evm_setBlockGasLimit", [hex(10**10)])])
        opened: list[tuple[bytes, str]] = []
        try:
            for start in range(0, count, OPEN_CHUNK):
                calls = []
                for n in range(start, min(start + OPEN_CHUNK, count)):
                    payer, salt = payers[n % len(payers)], n.to_bytes(32, "big")
                    data = selector + encode(["address", "address", "bytes32", "uint256"], [payee, ETH, salt, deposit])
                    tx = {
                        "from": payer,
                        "to": hub,
                        "value": hex(deposit),
                        "gas": hex(150_000),
                        "nonce": hex(n // len(payers)),  # payers send nothing else: their n-th transaction
                        "data": "0x" + data.hex(),
                    }
                    calls.append(("eth_sendTransaction", [tx]))
                    opened.append((channel_id(payer, payee, ETH, salt), payer))
                hashes = rpc(calls)
                rpc([("evm_mine", [])])
                receipts = rpc([("eth_getTransactionReceipt", [h]) for h in hashes[-1:]])
                if receipts[0] is None or int(receipts[0]["status"], 16) != 1:
                    raise SystemExit(f"opening channels failed near #{start}: {receipts[0]}")
        finally:  # back to a normal block: gas estimates search up to the block gas limit, and slow down with it
            rpc([("evm_setAutomine", [True]), ("evm_setBlockGasLimit", [hex(30_000_000)])])
    return opened


def _settle_all(settler: Settler, service: Service, console: Console) -> float:
    """Settle every channel with unsettled vouchers; the wall time per settled channel, in milliseconds."""
    began, settled = time.monotonic(), 0
    with console.status("settling every channel…"):
        while True:
            result = settler.tick(force=True)
            with service.db.read() as conn:
                open_now = batch_q.open_batches(conn)
            if result.started is None and not open_now and not result.finished:
                break
            for batch_id in result.finished:
                with service.db.read() as conn:
                    settled += len(batch_q.entries_of(conn, batch_id))
    elapsed = time.monotonic() - began
    console.print(f"settled {settled:,} channels in {elapsed:.1f}s")
    return 1000 * elapsed / max(settled, 1)
