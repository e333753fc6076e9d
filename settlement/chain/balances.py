"""Accounts' balances in the hub at given blocks, each read from the chain once.

A payee's summary shows what the hub holds for it at the block the store's facts are current to. Read per request,
any payee (and a payee is anyone with a key and a 1-wei channel to itself) could spend the chain's RPC quota, which the
indexer and the engine share, with a flood of summaries. A balance at a fixed block never changes, so it is kept:
the same summary asked again costs no call until the store's facts move to a new block.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from web3.contract import Contract

KEPT = 4096  # (account, token, block, hash) balances kept, least recently read out first


class HubBalances:
    """`balanceOf(account, token)` of the hub at a block, read once per block. Errors are the caller's to map
    (`rpc_errors`); nothing is kept for a read that failed."""

    def __init__(self, hub: Contract, kept: int = KEPT) -> None:
        self.hub = hub
        self.kept = kept
        self._read: OrderedDict[tuple[str, str, int, str | None], int] = OrderedDict()
        self._lock = threading.Lock()

    def at(self, account: str, token: str, block: int | None, block_hash: str | None) -> int:
        """The balance at `block` (whose hash is `block_hash`: after a reorganisation the number names another block,
        read again); None: at the latest block, read every time (it moves)."""
        if block is None:
            return int(self.hub.functions.balanceOf(account, token).call(block_identifier="latest"))
        key = (account, token, block, block_hash)
        with self._lock:
            found = self._read.get(key)
            if found is not None:
                self._read.move_to_end(key)
                return found
        value = int(self.hub.functions.balanceOf(account, token).call(block_identifier=block))
        with self._lock:
            self._read[key] = value
            while len(self._read) > self.kept:
                self._read.popitem(last=False)
        return value
