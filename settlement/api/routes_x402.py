"""The x402 facilitator routes (`/x402/supported`, `/x402/verify`, `/x402/settle`): what the official `x402`
package's HTTP facilitator client calls, with `http://<service>/x402` as the facilitator's URL.

Refusals are 200 answers with `isValid: false` / `success: false` and a stable reason, as x402 expects; a body that
is not x402 v2's shape is a 400 (`malformed_request`); the store or the chain being down is a 503 with our error
body, which a payee's middleware must not take for a refused payment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from x402.schemas import (
    PaymentPayload,
    PaymentRequirements,
    SchemeNotFoundError,
    SettleResponse,
    VerifyResponse,
)

from settlement.api.deps import ERRORS, ServiceDep, client_of_request
from settlement.api.facilitator import ChannelHubFacilitator, x402_facilitator
from settlement.api.middleware import INTERNAL_ERROR
from settlement.api.schemas import documented_body, parse_body, shape_error
from settlement.errors import BatchTooLargeError, InvalidSignatureError, MalformedRequestError, SettlementError
from settlement.x402.wire import Reason

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/x402", responses=ERRORS, tags=["x402"])


_RESEND = (
    "the payee's settle sent again after its answer was lost: a payment already accepted is answered as accepted (its "
    "receipt), not refused as a replay; nothing is charged twice"
)
_ATTEMPT = (
    "the payee's own id of this settle, the same in its resend: a resend is answered accepted only for the attempt "
    "that got the payment accepted (another attempt's is the replay it was), so a voucher replayed to a payee buys "
    "one response even when an answer is lost"
)
Attempt = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{8,64}$")]


class X402Request(BaseModel):
    """x402 v2's body of /verify and /settle (the facilitator client sends both alike)."""

    x402Version: Literal[2]
    paymentPayload: PaymentPayload
    paymentRequirements: PaymentRequirements


class X402SettleRequest(X402Request):
    """x402 v2's body of /settle, and ChannelHub additions beside it: `resend`, `attempt`."""

    resend: bool = Field(default=False, description=_RESEND)
    attempt: Attempt | None = Field(default=None, description=_ATTEMPT)


class X402Settlement(BaseModel):
    """One payment of a batch: what x402 v2's /settle body carries, and its `attempt`."""

    paymentPayload: PaymentPayload
    paymentRequirements: PaymentRequirements
    attempt: Attempt | None = Field(default=None, description=_ATTEMPT)

    @property
    def payment(self) -> tuple[PaymentPayload, PaymentRequirements]:
        return self.paymentPayload, self.paymentRequirements


class X402SettleBatch(BaseModel):
    """Many payments settled in one call (`POST /x402/settle/batch`): a ChannelHub addition to x402's facilitator
    routes, which our payee's facilitator client uses for settles that are in flight at once."""

    x402Version: Literal[2]
    settlements: list[X402Settlement] = Field(min_length=1)
    resend: bool = Field(default=False, description=_RESEND)


_Body = TypeVar("_Body", bound=X402Request)
_FRAME = {"paymentPayload", "paymentRequirements"}
_FRAMES = (_FRAME, _FRAME | {"attempt"})
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800 to \udfff


class _BatchOf(BaseModel):
    """A settle batch's outer shape, its payments not looked into (`X402Operations.settlements`)."""

    x402Version: Literal[2]
    settlements: list[Any] = Field(min_length=1)
    resend: bool = False


class X402Operations:
    """/verify and /settle on raw bodies, shared by the routes below and the fast path in front of FastAPI
    (settlement.api.fastpath), which serves them: each parses its own body, as the voucher routes do."""

    def __init__(self, scheme: ChannelHubFacilitator) -> None:
        self.scheme = scheme
        self.x402 = x402_facilitator(scheme)
        self.max_batch = scheme.service.settings.batch_max_items

    async def verify(self, body: bytes) -> bytes:
        """The payment judged as ingest would judge it, nothing stored; its store read on a worker thread."""
        answer = await asyncio.to_thread(self._verified, _request(body, X402Request))
        return answer.model_dump_json(by_alias=True, exclude_none=True).encode()

    async def settle(self, body: bytes) -> bytes:
        """A payment of our scheme is settled on the event loop, awaiting its group commit without holding a
        thread; any other goes to x402's facilitator, which answers `unsupported`. Raises `malformed_request` for a
        body that is not x402 v2's shape, and the store's or the chain's 503. A `resend` (X402SettleRequest) answers
        a payment accepted before as accepted, as a batch's does."""
        parsed = _request(body, X402SettleRequest)
        answer = await self._settle(parsed.paymentPayload, parsed.paymentRequirements, parsed.resend, parsed.attempt)
        return answer.model_dump_json(by_alias=True, exclude_none=True).encode()

    async def settle_batch(self, body: bytes, client: str) -> bytes:
        """Each payment settled as `/settle` would settle it, together (their vouchers share group commits), and
        answered in order. A payment the facilitator could not judge (the store or the chain down: what `/settle`
        answers 503) is answered `{"status": 503, "error": {code, message}}` in its place: the others stand.
        `client` pays for the batch's forged vouchers (`Service.forgeries`), and is refused while it owes."""
        forgeries = self.scheme.service.forgeries
        forgeries.admit(client)
        parsed, resend = self.settlements(body)
        if (count := len(parsed)) > self.max_batch:
            raise BatchTooLargeError(
                f"a batch holds at most {self.max_batch} settlements, got {count}", maxItems=self.max_batch
            )
        refused = {i: item for i, item in enumerate(parsed) if isinstance(item, SettleResponse)}
        items = {i: item for i, item in enumerate(parsed) if isinstance(item, X402Settlement)}
        ours: list[int] = []  # our scheme's, whose vouchers go to ingest together
        theirs: list[int] = []  # the rest, which x402's facilitator answers `unsupported`
        for i, item in items.items():
            (ours if self.scheme.serves(item.paymentPayload) else theirs).append(i)
        settled, others = await asyncio.gather(
            self.scheme.settle_many_async(
                [items[i].payment for i in ours], resend=resend, attempts=[items[i].attempt for i in ours]
            ),
            asyncio.gather(
                *(asyncio.to_thread(self._settled, *items[i].payment) for i in theirs), return_exceptions=True
            ),
        )
        forged = InvalidSignatureError.code
        forgeries.charge(client, sum(isinstance(s, SettleResponse) and s.error_reason == forged for s in settled))
        done = dict(zip(ours, settled, strict=True)) | dict(zip(theirs, others, strict=True)) | refused
        return b'{"settlements":[' + b",".join(_item(done[i]) for i in range(len(parsed))) + b"]}"

    @staticmethod
    def settlements(body: bytes) -> tuple[list[X402Settlement | SettleResponse], bool]:
        """A settle batch's payments. pydantic-core reads JSON 200 levels deep at most, and a payee's x402 reads a
        payment's `extensions` from the payer's header as deep as Python's JSON reader goes (~1,000) and passes them
        on: one payer's payment nested 201 levels deep had the whole batch refused (400), every other payer's request
        in it a 503. A batch too deep for pydantic-core is read by Python's reader and each payment parsed on its own:
        one that is not x402's shape is refused in its place (`invalid_payload`), the others judged as ever. Any other
        body that does not parse is a `malformed_request`, as before (a surrogate escape too: the fast reader refuses
        lone ones, Python's would not). And whether the batch is a resend (`X402SettleBatch.resend`)."""
        try:
            batch = parse_body(X402SettleBatch, body)
            return list(batch.settlements), batch.resend
        except MalformedRequestError as whole:
            read = _read_deep(body, whole)
            try:
                outer = _BatchOf.model_validate(read)
            except ValidationError:
                raise whole from None
            if not all(isinstance(item, dict) and set(item) in _FRAMES for item in outer.settlements):
                raise whole from None
        found: list[X402Settlement | SettleResponse] = []
        for item in outer.settlements:
            try:
                found.append(X402Settlement.model_validate(item))
            except ValidationError as ex:
                asked = item["paymentRequirements"]
                network = asked.get("network") if isinstance(asked, dict) else None
                found.append(
                    SettleResponse(
                        success=False,
                        error_reason=Reason.INVALID_PAYLOAD,
                        error_message=shape_error(ex.errors()).message,
                        transaction="",
                        network=network if isinstance(network, str) else "",
                    )
                )
        return found, outer.resend

    async def _settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, resend: bool, attempt: str | None
    ) -> SettleResponse:
        if self.scheme.serves(payload):
            return await self.scheme.settle_async(payload, requirements, resend=resend, attempt=attempt)
        return await asyncio.to_thread(self._settled, payload, requirements)

    def _verified(self, parsed: X402Request) -> VerifyResponse:
        try:
            return self.x402.verify(parsed.paymentPayload, parsed.paymentRequirements)
        except SchemeNotFoundError as ex:
            return VerifyResponse(is_valid=False, invalid_reason=Reason.UNSUPPORTED, invalid_message=str(ex))

    def _settled(self, payload: PaymentPayload, requirements: PaymentRequirements) -> SettleResponse:
        try:
            return self.x402.settle(payload, requirements)
        except SchemeNotFoundError as ex:
            return SettleResponse(
                success=False,
                error_reason=Reason.UNSUPPORTED,
                error_message=str(ex),
                transaction="",
                network=requirements.network,
            )


def operations(request: Request) -> X402Operations:
    """The app's x402 facilitator (create_app makes it)."""
    found: X402Operations = request.app.state.x402
    return found


@router.get("/supported", operation_id="x402Supported")
def supported(request: Request, service: ServiceDep) -> dict[str, Any]:
    """The schemes and networks this facilitator serves, with what a payee's requirements must carry."""
    answer: dict[str, Any] = operations(request).x402.get_supported().model_dump(by_alias=True, exclude_none=True)
    return answer


@router.post("/verify", operation_id="x402Verify", openapi_extra=documented_body(X402Request))
async def verify(request: Request) -> Response:
    """Would this payment be accepted now? Judged as ingest judges it; nothing is stored."""
    return _json(await operations(request).verify(await request.body()))


@router.post("/settle", operation_id="x402Settle", openapi_extra=documented_body(X402SettleRequest))
async def settle(request: Request) -> Response:
    """Accept the payment durably (answered after the commit) with its receipt; on-chain settlement is batched."""
    return _json(await operations(request).settle(await request.body()))


@router.post("/settle/batch", operation_id="x402SettleBatch", openapi_extra=documented_body(X402SettleBatch))
async def settle_batch(request: Request) -> Response:
    """Many payments settled in one call, answered in order (a ChannelHub addition to x402's routes)."""
    return _json(await operations(request).settle_batch(await request.body(), client_of_request(request)))


def _item(answer: SettleResponse | BaseException) -> bytes:
    """A batch's answer for one payment, as JSON: x402's settle answer (written by pydantic-core in one call, where
    `model_dump` and the standard library's encoder took 3 times as long: 9.4 against 3.2 µs), or the error
    `/settle` would have answered."""
    if isinstance(answer, SettleResponse):
        return answer.model_dump_json(by_alias=True, exclude_none=True).encode()
    if isinstance(answer, SettlementError):
        answer.detached()
        return json.dumps({"status": answer.status, "error": answer.body()}, separators=(",", ":")).encode()
    logger.error("unhandled error in a settle batch", exc_info=answer)
    return json.dumps({"status": 500, "error": INTERNAL_ERROR}, separators=(",", ":")).encode()


def _request(body: bytes, model: type[_Body]) -> _Body:
    """The body of `/verify` or `/settle` (`model`); one nested deeper than pydantic-core reads (200 levels) read by
    Python's reader, as a batch's payments are (`X402Operations.settlements`): a payee's x402 passes on a payment's
    `extensions` as deep as it read them from the payer's header (~1,000 levels), and a 400 for it became the payee's
    503, a payment retried that could never pass."""
    try:
        return parse_body(model, body)
    except MalformedRequestError as whole:
        read = _read_deep(body, whole)
    try:
        return model.model_validate(read)
    except ValidationError as ex:
        raise shape_error(ex.errors()) from None


def _read_deep(body: bytes, whole: MalformedRequestError) -> Any:
    """A body pydantic-core refused for its depth alone, read by Python's JSON reader; `whole` raised again for any
    other refusal, for a body Python's reader refuses too, and for one with a lone surrogate escape (which the fast
    reader refuses and Python's would take)."""
    if "recursion limit exceeded" not in whole.message or _SURROGATE_ESCAPE.search(body):
        raise whole
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise whole from None


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")
