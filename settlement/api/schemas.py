"""Request and response shapes of API v1; kept apart from storage records. Amounts are decimal strings."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from settlement.domain.ledger import receipt_body
from settlement.domain.model import Channel, ChannelId, ChannelStatus, Receipt, Voucher
from settlement.errors import MalformedRequestError
from settlement.store.channels import AssetSummary

Hex32 = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{64}$")]
HexBytes = Annotated[str, StringConstraints(pattern=r"^0x([0-9a-fA-F]{2}){0,256}$")]
AmountStr = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,78}$")]
Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
# What both stores hold: PostgreSQL text cannot hold NUL (one failed whole group commits). A lone surrogate, the other
# string no UTF-8 store takes, never gets this far: the JSON parser refuses it.
Reference = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00]*$")]
IdempotencyKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
STATUS_NAMES: dict[ChannelStatus, Literal["open", "closing", "closed"]] = {
    ChannelStatus.OPEN: "open",
    ChannelStatus.CLOSING: "closing",
    ChannelStatus.CLOSED: "closed",
}


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], body: bytes) -> M:
    """Parse and validate a JSON body in one pass of pydantic-core (the voucher routes' hot path skips FastAPI's)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as ex:
        raise shape_error(ex.errors()) from None


def shape_error(errors: Sequence[Any]) -> MalformedRequestError:
    """One error for every way a request can miss its documented shape: each problem named by field."""
    problems = [_problem(e) for e in errors]
    where = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
    return MalformedRequestError(f"the request does not have the documented shape ({where})", errors=problems)


def _problem(error: Any) -> dict[str, str]:
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
    return {"field": location, "problem": str(error.get("msg", "invalid"))}


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses its own body, with the model's schema inlined."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class VoucherIn(StrictModel):
    """A signed voucher: the channel's new cumulative total, signed by the payer with EIP-712."""

    channelId: Hex32
    cumulativeAmount: AmountStr = Field(description="decimal string, base units, 0 < amount < 2^256")
    signature: HexBytes = Field(description="65-byte r || s || v signature, 0x-prefixed hex")
    reference: Reference | None = Field(
        default=None,
        description="the app's own id, at most 256 characters, no NUL; NOT signed: see docs/api.md for what it can "
        "and cannot be trusted for",
    )
    idempotencyKey: IdempotencyKey | None = Field(
        default=None,
        description="the client's id of this payment (1-64 of A-Z a-z 0-9 _ - . :): a retry with the same key is "
        "the same payment and charges nothing more, even when signed from a re-read position; the same key with "
        "another amount gets 409 idempotency_key_reused",
    )

    def to_voucher(self) -> Voucher:
        return Voucher(
            channel_id=ChannelId(self.channelId.lower()),
            cumulative=int(self.cumulativeAmount),
            signature=bytes.fromhex(self.signature[2:]),
            reference=self.reference,
            idempotency_key=self.idempotencyKey,
        )


class VoucherBatchIn(StrictModel):
    vouchers: list[VoucherIn]


class ReceiptOut(BaseModel):
    channelId: str
    cumulativeAmount: str
    increment: str
    remaining: str
    acceptedAt: datetime
    reference: str | None = None
    idempotencyKey: str | None = None

    @classmethod
    def of(cls, receipt: Receipt) -> ReceiptOut:
        return cls.model_validate(receipt_body(receipt))


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
    latestSignature: str | None = Field(
        description="the payer's signature of acceptedCumulativeAmount: a payer SDK trusts the position only with it"
    )
    suspended: bool
    suspendedReason: str | None
    stoppedAt: int | None = Field(
        description="unix seconds its payee stopped the channel at the service, to close it: no voucher is accepted "
        "after it (POST /v1/channels/{channelId}/stop)"
    )

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
            latestSignature=None if channel.signature is None else "0x" + channel.signature.hex(),
            asOfBlock=channel.as_of_block,
            suspended=channel.suspended_reason is not None,
            suspendedReason=channel.suspended_reason,
            stoppedAt=None if channel.stopped_at_us is None else channel.stopped_at_us // 1_000_000,
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
    withdrawable: str | None = Field(
        description="the hub's balance for the payee at the block the other figures are current to (read once per "
        "block); null if the chain did not answer when it was first asked for at that block"
    )
    withdrawn: str = Field(description="taken out of the hub so far (confirmed Withdrawn events)")

    @classmethod
    def of(cls, summary: AssetSummary, *, withdrawable: int | None, withdrawn: int) -> AssetOut:
        return cls(
            token=summary.token,
            channels=summary.channels,
            accepted=str(summary.accepted),
            settled=str(summary.settled),
            unsettled=str(summary.unsettled),
            withdrawable=None if withdrawable is None else str(withdrawable),
            withdrawn=str(withdrawn),
        )


class PayeeSummaryOut(BaseModel):
    payee: str
    settleInterval: float | None = Field(description="seconds between the running engine's regular batches")
    assets: list[AssetOut]
    balancesUnread: list[str] = Field(
        default_factory=list,
        description="assets whose withdrawable was not asked of the chain (null): a summary reads "
        "SETTLEMENT_SUMMARY_BALANCES_MAX balances at most, ETH's and the configured tokens' first",
    )


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
