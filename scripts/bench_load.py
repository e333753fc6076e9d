"""Load generator for `bench.py ingest`, run as its own process so it does not share a GIL with the server.

Reads pre-signed vouchers (one JSON list per channel, cumulative 1, 2, 3, …), posts them, prints one JSON line.
Each worker owns whole channels and sends a channel's vouchers in order, so every answer should be 201. Given several
`--url`s (server processes on one store), requests are spread over them like a round-robin balancer would: a worker
(closed loop) or a request (open loop) goes to the next URL.
aiohttp, not httpx: httpx's async pool spends more CPU per request than the server under test does.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from scripts.proc_cpu import machine_seconds

TIMEOUT = aiohttp.ClientTimeout(total=60)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(args: argparse.Namespace, channels: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """`concurrency` workers, each posting as fast as answers come back."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    vouchers = 0
    deadline = time.perf_counter() + args.seconds
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, headers=_headers(args)) as client:

        async def worker(index: int) -> None:
            nonlocal vouchers
            base = args.url[index % len(args.url)]
            owned = channels[index :: args.concurrency]
            cursor = [0] * len(owned)
            spent: set[int] = set()  # its channels with no voucher left to send
            turn = 0
            while time.perf_counter() < deadline and len(spent) < len(owned):
                slot = turn % len(owned)
                turn += 1
                chain = owned[slot]
                if cursor[slot] + args.batch > len(chain):
                    # Done with this channel. Once all are, the worker stops: it used to spin without yielding
                    # until the deadline, holding the event loop (the other workers' answers unread meanwhile) and
                    # a core, and a run longer than the servers' keep-alive failed on a connection they had closed.
                    spent.add(slot)
                    continue
                items = chain[cursor[slot] : cursor[slot] + args.batch]
                cursor[slot] += args.batch
                started = time.perf_counter()
                path, payload = (
                    ("/v1/vouchers", items[0]) if args.batch == 1 else ("/v1/vouchers/batch", {"vouchers": items})
                )
                async with client.post(base + path, json=payload) as response:
                    await response.read()
                latencies.append(time.perf_counter() - started)
                statuses[response.status] = statuses.get(response.status, 0) + 1
                vouchers += len(items)

        window = Window()
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        elapsed = time.perf_counter() - window.started
    return summary(latencies, statuses, vouchers, elapsed) | window.close()


async def open_loop(args: argparse.Namespace, channels: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Requests start on a fixed schedule (`rate` per second) whatever the answers do: latency under offered load."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    total = int(args.rate * args.seconds)
    available = len(channels) * min(len(chain) for chain in channels)  # sent a voucher of each channel in turn
    if total > available:
        raise SystemExit(f"{total} requests asked for (--rate x --seconds), the file holds {available} in turn")
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, headers=_headers(args)) as client:

        async def one(base: str, body: dict[str, Any]) -> None:
            started = time.perf_counter()
            async with client.post(base + "/v1/vouchers", json=body) as response:
                await response.read()
            latencies.append(time.perf_counter() - started)
            statuses[response.status] = statuses.get(response.status, 0) + 1

        tasks = []
        window = Window()
        started = window.started
        for k in range(total):
            channel = channels[k % len(channels)]
            body = channel[k // len(channels)]
            delay = started + k / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(args.url[k % len(args.url)], body)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return summary(latencies, statuses, total, elapsed) | {"offered_per_s": args.rate} | window.close()


async def flood(args: argparse.Namespace, channels: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """`count` bogus requests, as fast as `concurrency` connections go, from many forged client addresses (behind
    the trusted proxy): vouchers for channels that do not exist, real channels with bad signatures, bodies of random
    bytes, and reads of unknown channels, in turn."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    real = [chain[0] for chain in channels]
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as client:
        queue = iter(range(args.count))

        async def worker() -> None:
            for k in queue:
                base = args.url[k % len(args.url)]
                headers = {"X-Forwarded-For": f"10.66.{k % 64}.{k % 251}"}  # 64 x 251 forged clients
                kind = args.kinds[k % len(args.kinds)]
                started = time.perf_counter()
                if kind == 3:
                    request = client.get(f"{base}/v1/channels/0x{os.urandom(32).hex()}", headers=headers)
                elif kind == 2:
                    request = client.post(
                        f"{base}/v1/vouchers",
                        data=os.urandom(200),
                        headers=headers | {"content-type": "application/json"},
                    )
                else:
                    body = dict(real[k % len(real)])
                    if kind == 0:
                        body["channelId"] = "0x" + os.urandom(32).hex()
                    else:
                        body["signature"] = "0x" + os.urandom(65).hex()
                    request = client.post(f"{base}/v1/vouchers", json=body, headers=headers)
                async with request as response:
                    await response.read()
                latencies.append(time.perf_counter() - started)
                statuses[response.status] = statuses.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    return summary(latencies, statuses, 0, elapsed)


class Window:
    """The timed window: this process's CPU in it and the machine's, so that the bench's figures leave out this
    process's start-up (reading tens of MB of vouchers, importing aiohttp: a second of one core before the first
    request, which made the machine look idler and this process costlier than they were while measured)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.cpu = time.process_time()
        self.machine = machine_seconds()

    def close(self) -> dict[str, float]:
        busy, total = machine_seconds()
        return {
            "load_cpu_seconds": round(time.process_time() - self.cpu, 4),
            "machine_busy_seconds": round(busy - self.machine[0], 3),
            "machine_seconds": round(total - self.machine[1], 3),
        }


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"X-Forwarded-For": args.forwarded_for} if args.forwarded_for else {}


def summary(latencies: list[float], statuses: dict[int, int], vouchers: int, elapsed: float) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "vouchers": vouchers,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "vouchers_per_s": round(vouchers / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else 0.0,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, action="append", help="a server; repeat for several")
    parser.add_argument("--vouchers", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0, help="open loop at this many requests/s")
    parser.add_argument("--forwarded-for", help="send X-Forwarded-For: this (a client behind a trusted proxy)")
    parser.add_argument("--flood", type=int, default=0, dest="count", help="send this many bogus requests instead")
    parser.add_argument(
        "--kinds",
        type=lambda text: [int(k) for k in text.split(",")],
        default=[0, 1, 2, 3],
        help="the flood's kinds, in turn: 0 made-up channel, 1 bad signature, 2 random bytes, 3 read of a made-up "
        "channel (default: all)",
    )
    args = parser.parse_args()
    channels = json.loads(args.vouchers.read_text())
    # What this process holds now (its imports, the vouchers' lists) lives until the end: out of the collector's scans,
    # as the service keeps what its start-up built. A full collection walked ~30,000 objects (~10 ms), a stall of
    # every request in flight here that was counted as the server's latency.
    gc.collect()
    gc.freeze()
    if args.count:
        result = asyncio.run(flood(args, channels))
    else:
        result = asyncio.run(open_loop(args, channels) if args.rate else closed_loop(args, channels))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
