"""The cooperative refund, asked for by the payer through the payee's paid API.

Only the payee can close a channel at once (`closeByPayee`: paid what the payer signed, the rest of the deposit back
to the payer in the same transaction), so the payer asks: it signs a `RefundRequest` (settlement.eip712.refunds) and
posts it to the route the payee mounts next to its paid routes. The payee checks, against the chain, that the signer
is the channel's payer and that the channel pays this payee, then closes it with `PayeeClient.refund` (the payer's
latest voucher the service holds, checked against the payer's key). Mounting the route is the payee's choice; the
payee pays the transaction's gas.

    payee app:  app.include_router(refund_router(PayeeClient(...)))          # POST /x402/channelhub/refund
    payer app:  ask_refund(f"{api}/x402/channelhub/refund", payer, channel_id)  # what came back to the payer

`refund_router` is FastAPI's route (settlement.x402.fastapi) around `RefundDesk`, which judges a request's body and
makes the refund; another web framework mounts the desk the same way.

Every refusal is a 4xx with a stable code (settlement.errors): malformed_request, refund_request_expired, forbidden
(not the payer's signature, or another payee's channel), channel_not_found, channel_closed (a replay after the
refund changes nothing; `ask_refund` answers it with the hub's figure of a closed channel), rate_limited (429: more
requests than the desk's budget of chain reads, or than one client's share of it: `admit`). A request names an
expiry at most `max_ttl` seconds ahead (600), so a captured request is not usable for long; refunds of one payee app
are made one at a time, so two racing requests close the channel once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple

import httpx
from eth_utils.address import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from settlement.chain.node import rpc_errors
from settlement.domain.buckets import Buckets
from settlement.domain.model import ChannelStatus, ChannelViewField
from settlement.eip712.refunds import refund_requester, sign_refund_request
from settlement.errors import (
    ChainUnavailableError,
    ChannelClosedError,
    ChannelNotFoundError,
    ForbiddenError,
    MalformedRequestError,
    RateLimitedError,
    RefundRequestExpiredError,
    SettlementError,
    UntrustedServiceError,
)
from settlement.sdk.answers import refusal, unanswered
from settlement.sdk.bounded import bounded_client
from settlement.sdk.payee import PayeeClient
from settlement.sdk.payer import PayerClient

REFUND_PATH = "/x402/channelhub/refund"
MAX_TTL = 600
CHAIN_READS_PER_SECOND = 5.0
CHAIN_READS_BURST = 20.0
CLIENT_REQUESTS_PER_SECOND = 1.0  # each client's share (its address), so that one client's flood is not everyone's
CLIENT_REQUESTS_BURST = 5.0
CLIENTS_KEPT = 10_000

_Hex32 = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{64}$")]
_Signature = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{130}$")]


class RefundRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channelId: _Hex32  # the wire's camelCase
    expires: int = Field(ge=0, lt=2**64)
    signature: _Signature


def ask_refund(
    url: str,
    payer: PayerClient,
    channel_id: str,
    *,
    ttl: int = 300,
    timeout: float = 60,
    http: httpx.Client | None = None,
    behind: float = 10,
) -> int:
    """Ask the payee behind `url` to refund the channel now; returns what went back to the payer's hub balance, as
    the hub says (the payee's figure is its word). A refusal raises the SDK's error for its code (a
    ServiceRejectedError; no answer, one of code `service_unavailable`, 503); an answer of success while the hub
    holds the channel open, UntrustedServiceError.
    Asking again is safe: a channel already closed (the first answer lost on its way, the refund made) is answered
    `channel_closed` by the payee, and this returns the hub's figure as the first call would have, not that error.
    `http`: the client to send it with (a proxy, other timeouts), else one made for the request. `behind`: how long
    the payer's node may take to show the payee's close (a provider's balancer sends reads to nodes blocks apart)
    before the hub's word that the channel is open is taken, and the payee's node to show a channel the payer's
    holds (`channel_not_found` meanwhile: the request is sent again). A 429 (`rate_limited`) is asked again after
    its `retryAfter` while that is within `timeout` of the first request, else raised."""
    raw = bytes.fromhex(channel_id.removeprefix("0x"))
    expires = int(time.time()) + ttl
    signature = sign_refund_request(payer.account, payer.domain, raw, expires)
    body = {"channelId": "0x" + raw.hex(), "expires": expires, "signature": "0x" + signature.hex()}
    start = time.monotonic()
    deadline = start + behind
    with contextlib.ExitStack() as owned:
        client = http or owned.enter_context(bounded_client("", timeout))
        while True:
            try:
                answer = client.post(url, json=body, timeout=timeout)
            except httpx.TransportError as ex:  # no answer: httpx's own error was out of the SDK's root
                where = httpx.URL(url).copy_with(query=None, fragment=None)  # a key in its query is not repeated
                raise unanswered(
                    f"POST {where}",
                    f"the payee at {where} did not answer the refund request of 0x{raw.hex()} "
                    f"({type(ex).__name__}); it may have made it: ask again (a refund made is answered as made)",
                ) from ex
            refused = None if answer.status_code == 200 else refusal(answer)
            if isinstance(refused, RateLimitedError):
                wait = refused.retry_after  # a payee's word: 1 s at least, never a tight loop
                pause = None if wait is None else max(wait, 1)
                if pause is None or time.monotonic() + pause > start + timeout:
                    break
                time.sleep(pause)  # over this client's share (its own pace, or a flood): asked again within `timeout`
                continue
            if not isinstance(refused, ChannelNotFoundError) or time.monotonic() >= deadline or not _exists(payer, raw):
                break
            time.sleep(1.0)  # the payee's node is behind: asked again, within a client's share (RefundDesk.admit)
    if refused is not None and not isinstance(refused, ChannelClosedError):
        raise refused
    view = _closed(payer, raw, behind)
    if view is None:
        if refused is not None:  # the payee's word against the hub's: the channel is open, nothing came back
            raise refused
        raise UntrustedServiceError(f"the payee at {url} says it refunded 0x{raw.hex()}; the hub holds it open")
    return int(view[ChannelViewField.DEPOSIT]) - int(view[ChannelViewField.SETTLED])


def _view(payer: PayerClient, raw: bytes) -> tuple[Any, ...]:
    """The channel as the payer's node holds it in the hub."""
    with rpc_errors(f"reading channel 0x{raw.hex()} from the hub"):
        return tuple(payer.hub.functions.channel(raw).call())


def _exists(payer: PayerClient, raw: bytes) -> bool:
    """Whether the payer's node holds the channel: a payee that does not know it yet reads a node behind (a channel
    opened moments ago, a provider's balancer), and is asked again; an id the hub does not hold is refused at once."""
    return int(_view(payer, raw)[ChannelViewField.STATUS]) != ChannelStatus.NONE


def _closed(payer: PayerClient, raw: bytes, behind: float) -> tuple[Any, ...] | None:
    """The hub's view of the channel once the payer's node shows it closed, asked again for up to `behind` seconds;
    None if it does not. The payee's node saw the close mined before it answered; the payer's may be some blocks
    behind it, and taken at its first word the payee was called a liar for a refund it made."""
    deadline = time.monotonic() + behind
    while True:
        view = _view(payer, raw)
        if view[ChannelViewField.STATUS] == ChannelStatus.CLOSED:
            return view
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.25)


class DeskAnswer(NamedTuple):
    status: int  # HTTP
    body: dict[str, Any]  # JSON: the refund, or an error's body (`code`, `message`, ...)


class RefundDesk:
    """A payee's answers to refund requests: `answer(body)` -> a DeskAnswer. Blocking (the chain, the
    service): a web framework runs it off its event loop.

    Each well-formed, unexpired request costs a read of the chain, so they are budgeted (`chain_reads_per_second`,
    bursts of `burst`): a flood of made-up requests costs the payee a bounded number of RPC calls and gets 429
    `rate_limited`; an honest payer refused in a flood retries after `retryAfter`. And each client (its address, as
    the web framework gives it) has a share of its own, asked first (`admit`, `client_requests_per_second`, bursts
    of `client_burst`): one client's flood took the whole budget, and every other payer's refund was refused."""

    def __init__(
        self,
        payee: PayeeClient,
        *,
        max_ttl: int = MAX_TTL,
        chain_reads_per_second: float = CHAIN_READS_PER_SECOND,
        burst: float = CHAIN_READS_BURST,
        client_requests_per_second: float = CLIENT_REQUESTS_PER_SECOND,
        client_burst: float = CLIENT_REQUESTS_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.payee, self.max_ttl, self._clock = payee, max_ttl, clock
        self._reads = Buckets(chain_reads_per_second, burst, max_keys=1)
        self._clients = Buckets(client_requests_per_second, client_burst, max_keys=CLIENTS_KEPT)
        self._one_at_a_time = threading.Lock()

    def admit(self, client: str) -> DeskAnswer | None:
        """None if `client` (its address) is within its share of requests, else the 429 to answer it: no I/O, so a
        framework asks on its event loop, before the request waits for the desk."""
        wait = self._clients.take(client, self._clock())
        if wait is None:
            return None
        return _refusal(RateLimitedError("too many refund requests from this client: retry later", retryAfter=wait))

    def answer(self, body: bytes) -> DeskAnswer:
        try:
            asked = RefundRequestIn.model_validate_json(body)
            return DeskAnswer(200, {"channelId": asked.channelId, "refunded": str(self._refund(asked))})
        except ValidationError as ex:
            return _refusal(MalformedRequestError(f"not a refund request: {ex.error_count()} field(s) wrong"))
        except SettlementError as ex:
            return _refusal(ex)
        except Exception as ex:  # the chain or the service did not answer: retryable, nothing was sent
            return _refusal(ChainUnavailableError(f"the refund could not be made now: {type(ex).__name__}"))

    def _refund(self, asked: RefundRequestIn) -> int:
        now = int(time.time())
        if asked.expires <= now:
            raise RefundRequestExpiredError("the refund request has expired: sign a fresh one")
        if asked.expires > now + self.max_ttl:
            raise RefundRequestExpiredError(f"a refund request may be valid for {self.max_ttl} s at most")
        wait = self._reads.take(None, self._clock())
        if wait is not None:
            raise RateLimitedError("too many refund requests: retry later", retryAfter=wait)
        raw = bytes.fromhex(asked.channelId[2:])
        payee = self.payee
        with self._one_at_a_time:
            view = payee.hub.functions.channel(raw).call()
            status = int(view[ChannelViewField.STATUS])
            if status == int(ChannelStatus.NONE):
                raise ChannelNotFoundError(f"no channel {asked.channelId} on chain")
            if to_checksum_address(view[ChannelViewField.PAYEE]) != payee.address:
                raise ForbiddenError(f"channel {asked.channelId} does not pay this payee")
            signer = refund_requester(payee.domain, raw, asked.expires, bytes.fromhex(asked.signature[2:]))
            if signer != to_checksum_address(view[ChannelViewField.PAYER]):
                raise ForbiddenError("the refund request is not signed by the channel's payer")
            if status == int(ChannelStatus.CLOSED):
                raise ChannelClosedError(f"channel {asked.channelId} is closed: nothing left to refund")
            return payee.refund(asked.channelId)


def _refusal(error: SettlementError) -> DeskAnswer:
    return DeskAnswer(error.status, error.body())
