"""Request and response shapes of API v1; kept apart from storage records. Amounts are decimal strings."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from settlement.model import Channel, ChannelStatus, Receipt, Voucher
from settlement.store.channels import AssetSummary

Hex32 = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{64}$")]
HexBytes = Annotated[str, StringConstraints(pattern=r"^0x([0-9a-fA-F]{2}){0,256}$")]
AmountStr = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,78}$")]
Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
STATUS_NAMES: dict[ChannelStatus, Literal["open", "closing", "closed"]] = {
    ChannelStatus.OPEN: "open",
    ChannelStatus.CLOSING: "closing",
    ChannelStatus.CLOSED: "closed",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class VoucherIn(_Strict):
    """A signed voucher: the channel's new cumulative total, signed by the payer with EIP-712."""

    channelId: Hex32
    cumulativeAmount: AmountStr = Field(description="decimal string, base units, 0 < amount < 2^256")
    signature: HexBytes = Field(description="65-byte r || s || v signature, 0x-prefixed hex")
    reference: str | None = Field(default=None, max_length=256, description="the app's own id; not signed")

    def to_voucher(self) -> Voucher:
        return Voucher(
            channel_id=self.channelId.lower(),
            cumulative=int(self.cumulativeAmount),
            signature=bytes.fromhex(self.signature[2:]),
            reference=self.reference,
        )


class VoucherBatchIn(_Strict):
    vouchers: list[VoucherIn]


class ReceiptOut(BaseModel):
    channelId: str
    cumulativeAmount: str
    increment: str
    remaining: str
    acceptedAt: datetime
    reference: str | None = None

    @classmethod
    def of(cls, receipt: Receipt) -> ReceiptOut:
        return cls(
            channelId=receipt.channel_id,
            cumulativeAmount=str(receipt.cumulative),
            increment=str(receipt.increment),
            remaining=str(receipt.remaining),
            acceptedAt=receipt.accepted_at,
            reference=receipt.reference,
        )


class ErrorOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class BatchItemOut(BaseModel):
    index: int
    status: int = Field(description="201 accepted, 200 already accepted (same receipt), else the error's status")
    receipt: ReceiptOut | None = None
    error: ErrorOut | None = None


class BatchOut(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[BatchItemOut]


class ChannelOut(BaseModel):
    channelId: str
    payer: str
    payee: str
    token: str
    salt: str
    deposit: str
    settled: str
    acceptedCumulativeAmount: str = Field(description="the highest voucher the service accepted")
    unsettled: str
    remaining: str = Field(description="deposit minus the accepted cumulative amount")
    status: Literal["open", "closing", "closed"]
    closeDeadline: int | None
    asOfBlock: int = Field(description="the confirmed block the chain facts are current to")
    suspended: bool
    suspendedReason: str | None

    @classmethod
    def of(cls, channel: Channel) -> ChannelOut:
        return cls(
            channelId=channel.channel_id,
            payer=channel.payer,
            payee=channel.payee,
            token=channel.token,
            salt=channel.salt,
            deposit=str(channel.deposit),
            settled=str(channel.settled),
            acceptedCumulativeAmount=str(channel.accepted),
            unsettled=str(channel.unsettled),
            remaining=str(max(channel.deposit - channel.floor, 0)),
            status=STATUS_NAMES[channel.status],
            closeDeadline=channel.close_deadline,
            asOfBlock=channel.as_of_block,
            suspended=channel.suspended_reason is not None,
            suspendedReason=channel.suspended_reason,
        )


class ChannelPage(BaseModel):
    items: list[ChannelOut]
    nextCursor: str | None


class PaymentPage(BaseModel):
    items: list[ReceiptOut]
    nextCursor: str | None


class AssetOut(BaseModel):
    token: str
    channels: int
    accepted: str
    settled: str
    unsettled: str

    @classmethod
    def of(cls, summary: AssetSummary) -> AssetOut:
        return cls(
            token=summary.token,
            channels=summary.channels,
            accepted=str(summary.accepted),
            settled=str(summary.settled),
            unsettled=str(summary.unsettled),
        )


class PayeeSummaryOut(BaseModel):
    payee: str
    assets: list[AssetOut]


class Health(BaseModel):
    status: str
    version: str


class Readiness(BaseModel):
    status: str
    chainId: int
    contract: str
    store: str
    headBlock: int
    confirmedBlock: int
    indexedBlock: int
    indexerLag: int


class Eip712Info(BaseModel):
    domain: dict[str, str | int]
    types: dict[str, list[dict[str, str]]]
    primaryType: str
