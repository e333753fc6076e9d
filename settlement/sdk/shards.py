"""A payer's service in a deployment sharded by payer (docs/scaling.md): the one that takes its vouchers."""

from __future__ import annotations

from collections.abc import Sequence

from eth_utils.address import to_checksum_address

from settlement.domain.model import Address
from settlement.domain.shards import shard_of


def service_for(payer: str, service_urls: Sequence[str]) -> str:
    """The URL among `service_urls` (shard 0 first, as the operator lists them) of the shard that takes `payer`'s
    vouchers; any other answers 421 `wrong_shard`, naming the right one."""
    if not service_urls:
        raise ValueError("no service URL to choose from")
    return service_urls[shard_of(Address(to_checksum_address(payer)), len(service_urls))]
