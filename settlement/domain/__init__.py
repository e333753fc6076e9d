"""The records and rules every layer shares: pure, importing nothing but the standard library and
settlement.errors."""

from settlement.domain.ledger import Verdict, judge
from settlement.domain.model import (
    END_OF_BLOCK,
    ETH,
    BlockRef,
    Channel,
    ChannelStatus,
    ChannelViewField,
    HubEvent,
    Receipt,
    Voucher,
)

__all__ = [
    "END_OF_BLOCK",
    "ETH",
    "BlockRef",
    "Channel",
    "ChannelStatus",
    "ChannelViewField",
    "HubEvent",
    "Receipt",
    "Verdict",
    "Voucher",
    "judge",
]
