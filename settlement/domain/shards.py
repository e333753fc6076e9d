"""Which shard of a sharded deployment takes a payer's vouchers (docs/scaling.md): plain databases, one `settlement
serve` deployment each, chosen by the payer's address. A channel's payer is hashed into its id and never changes, so
all of a channel's vouchers meet in one store, and a payer's spending caps stay within one shard.

A pure function of the address, the same in the service (which refuses another shard's payers) and in a payer's SDK
(which picks the service's URL by it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from settlement.domain.model import Address


def shard_of(payer: Address, shards: int) -> int:
    """The shard, in [0, shards), of a payer: its address's hash (not the address: vanity addresses cluster)."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    digest = hashlib.blake2b(bytes.fromhex(payer[2:]), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


@dataclass(frozen=True)
class Shard:
    """This deployment's place among `count` shards; `Shard(0, 1)` is an unsharded deployment that owns everyone."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} is not one of {self.count} shards (0 to {self.count - 1})")

    def owner(self, payer: Address) -> int:
        """The shard that takes this payer's vouchers: this one, without a hash, when the deployment is unsharded."""
        return self.index if self.count == 1 else shard_of(payer, self.count)

    def owns(self, payer: Address) -> bool:
        return self.owner(payer) == self.index


UNSHARDED = Shard()
