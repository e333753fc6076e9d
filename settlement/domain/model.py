"""The records every layer passes around: channels as the service knows them, vouchers and receipts.

Plain frozen dataclasses with no behaviour that needs I/O, so the ledger's rules can be tested without a database.
Money is always an int in base units; ids are 0x-prefixed lowercase hex; addresses are checksummed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import NamedTuple, NewType

# One representation per scalar in the service's layers (the SDK holds a channel id as its 32 raw bytes instead):
ChannelId = NewType("ChannelId", str)  # "0x" + 64 lowercase hex digits
Address = NewType("Address", str)  # EIP-55 checksummed "0x" + 40 hex digits; ETH is the zero address

ETH = Address("0x0000000000000000000000000000000000000000")
MAX_UINT256 = 2**256 - 1  # the largest amount a voucher can carry
_UINT256 = re.compile(r"0|[1-9][0-9]{0,77}")  # ASCII digits, matched whole: str.isdigit takes other scripts' too


def uint256_of(value: object) -> int | None:
    """An amount another party sent (a service's, a payee's, a facilitator's), in its one form: a string of decimal
    digits, no sign, space or leading zero, below 2^256; None for anything else. Never `int()` of the text as it
    came: it takes " 7", "+7", "7\n" and other scripts' digits, and raises on "²" and on 5,000 digits."""
    return int(value) if isinstance(value, str) and _UINT256.fullmatch(value) and int(value) <= MAX_UINT256 else None


_SIGNATURE_HEX = re.compile(r"0x[0-9a-fA-F]{130}")


def signature_of(value: object) -> bytes | None:
    """A 65-byte signature (r, s, v) another party sent, in its one form: "0x" + 130 hex digits, matched whole (`$`
    would take a final newline, which `bytes.fromhex` skips); None for anything else."""
    return bytes.fromhex(value[2:]) if isinstance(value, str) and _SIGNATURE_HEX.fullmatch(value) else None


_HEX32 = re.compile(r"0x[0-9a-fA-F]{64}")


def hex32_of(value: object) -> str | None:
    """A 32-byte id another party sent (a channel id), in its one form: "0x" + 64 hex digits, matched whole, returned
    in lower case (the one spelling of a channel id); None for anything else."""
    return value.lower() if isinstance(value, str) and _HEX32.fullmatch(value) else None


# A position on the chain is (block number, log index). A channel read from the chain's state at block B stands after
# every log of B, so no event of B is applied to it again; the log index of that position is END_OF_BLOCK.
END_OF_BLOCK = 2**31 - 1


class ChannelStatus(IntEnum):
    """The hub's channel status; the values are the contract's enum values (NONE: never opened, never stored)."""

    NONE = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class ChannelViewField(IntEnum):
    """The fields of the tuple the hub's `channel(id)` view returns (IChannelHub.ChannelView), by position."""

    PAYER = 0
    PAYEE = 1
    TOKEN = 2
    DEPOSIT = 3
    SETTLED = 4
    CLOSE_DEADLINE = 5
    STATUS = 6


class HubEvent(StrEnum):
    """The hub's events that change a channel, by name."""

    CHANNEL_OPENED = "ChannelOpened"
    CHANNEL_TOPPED_UP = "ChannelToppedUp"
    CHANNELS_SETTLED = "ChannelsSettled"
    CLOSE_REQUESTED = "CloseRequested"
    CHANNEL_CLOSED = "ChannelClosed"


class RiskKind(StrEnum):
    """What a risk event says happened (docs/security.md#risk-controls): the monitor's findings and the operator's
    holds, stored, counted and listed by this name."""

    BURST = "burst"
    DUST = "dust"
    REPEATED_REFUSALS = "repeated_refusals"
    CHANNEL_SPREAD = "channel_spread"
    CLOSE_WHILE_STREAMING = "close_while_streaming"
    CHANNEL_HELD = "channel_held"


class ChainPosition(NamedTuple):
    """Where an event stands in the chain's order; positions compare in that order."""

    block: int
    log: int  # the log's index in its block (-1: before the block's first)


@dataclass(frozen=True)
class Channel:
    """One channel: the chain's facts plus the latest voucher the service accepted.

    The facts are current to the chain position (`as_of_block`, `as_of_log`): every event at or before it is
    reflected, none after it. Several events of one channel can share a block (even a transaction), so the log index
    is part of the position.
    """

    channel_id: ChannelId
    payer: Address
    payee: Address
    token: Address
    salt: str
    deposit: int
    settled: int
    status: ChannelStatus
    close_deadline: int | None
    as_of_block: int
    as_of_log: int = END_OF_BLOCK
    accepted: int = 0
    signature: bytes | None = None
    suspended_reason: str | None = None
    stopped_at_us: int | None = None  # the payee stopped it at the service to close it: no voucher accepted after

    @property
    def unsettled(self) -> int:
        return max(self.accepted - self.settled, 0)

    @property
    def floor(self) -> int:
        """A new voucher must be above this: what was accepted, or what the chain already settled if more."""
        return max(self.accepted, self.settled)

    @property
    def position(self) -> ChainPosition:
        """The chain position the facts are current to."""
        return ChainPosition(self.as_of_block, self.as_of_log)

    def with_voucher(self, cumulative: int, signature: bytes) -> Channel:
        """The writer calls this once per accepted voucher: a copy of the fields with two replaced costs a third of
        building the frozen dataclass again (which sets each of its 14 fields through `object.__setattr__`)."""
        moved = object.__new__(Channel)
        fields = moved.__dict__
        fields.update(self.__dict__)
        fields["accepted"] = cumulative
        fields["signature"] = signature
        return moved


@dataclass(frozen=True)
class BlockRef:
    """One block of one chain instance: a number says where, only the hash says which chain."""

    number: int
    hash: str


@dataclass(frozen=True)
class Voucher:
    """A voucher as submitted: the signed (channelId, cumulativeAmount), and unsigned metadata: the app's reference,
    the client's idempotency key, and the x402 settle attempt that submitted it."""

    channel_id: ChannelId
    cumulative: int
    signature: bytes
    reference: str | None = None
    idempotency_key: str | None = None  # the client's id of the payment: a retry with it never pays twice
    price: int | None = None  # the exact increment it must pay over the channel's position (x402); None: any
    attempt: str | None = None  # the payee's id of the x402 settle that submitted it (settlement.api.facilitator)

    @property
    def key(self) -> tuple[ChannelId, int]:
        """What the signature commits to; duplicates are found by this, never by signature bytes."""
        return self.channel_id, self.cumulative


@dataclass(frozen=True)
class Receipt:
    """What the service answers for an accepted voucher; a re-sent voucher gets the same receipt back."""

    channel_id: ChannelId
    cumulative: int
    increment: int
    remaining: int
    accepted_at: datetime
    reference: str | None = None
    idempotency_key: str | None = None
    attempt: str | None = None  # the x402 settle that got it accepted: stored, never shown (not in `receipt_body`)


def utcnow() -> datetime:
    """Now, in UTC to the microsecond, the only clock the ledger reads."""
    return datetime.now(UTC)
