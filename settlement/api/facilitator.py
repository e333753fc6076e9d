"""This service as an x402 facilitator for the `channelhub` scheme: the plug-in the official `x402` package's
facilitator routes to (`SchemeNetworkFacilitator`), over the ledger and the store.

`verify` judges the voucher exactly as ingest would, committing nothing. `settle` is the durable acceptance: its
answer comes after the commit, carries the receipt and the channel's position, and moves no money on chain (the
engine settles vouchers in batches). A voucher buys one response: once accepted, the same voucher is refused as
`voucher_replayed`, also when it carries the same payment identifier (the first payment stands; nothing more is
charged). Every answer is the x402 answer with a reason; the store or the chain being down raises instead, so that
the route answers 503 and a payee does not mistake it for a refused payment.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from x402 import x402FacilitatorSync
from x402.interfaces import FacilitatorContext, FacilitatorExtension
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

from settlement.chain.node import rpc_errors
from settlement.domain.ledger import Verdict, receipt_body
from settlement.domain.model import ETH, ChannelId, Receipt, Voucher
from settlement.eip712.receipts import ReceiptSigner, SignedFields, receipt_domain
from settlement.errors import ChannelNotFoundError, ConfigError, RequestError, SettlementError, WrongShardError
from settlement.ingest.pipeline import Outcome
from settlement.server.operator import operator_account
from settlement.server.service import Service
from settlement.x402.wire import (
    SCHEME,
    SETTLE_ATTEMPT,
    PayloadError,
    Reason,
    VoucherPayload,
    answers,
    base_units,
    network_of,
    payment_identifier,
    same_address,
)

IDEMPOTENCY_KEY_MAX = 64  # what the store keeps of a payment's key
PARTIES_KEPT = 100_000  # channels whose parties are held in memory (all forgotten at once beyond)


@dataclass(frozen=True)
class Parties:
    """A channel's payer, payee and token: they never change (ChannelHub hashes them into the id)."""

    payer: str
    payee: str
    token: str


class Refused(Exception):
    """A payment the facilitator refuses, with its stable reason."""

    def __init__(self, reason: str, message: str, payer: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.payer = payer


class ChannelHubFacilitator:
    """The `channelhub` scheme for one deployment (one network: this hub's chain). Built with the app, while the
    chain answers: the operator's account is resolved once."""

    scheme = SCHEME
    caip_family = "eip155:*"

    def __init__(self, service: Service) -> None:
        self.service = service
        self._parties: dict[ChannelId, Parties] = {}
        self._parties_lock = threading.Lock()
        self.network = network_of(service.deployment.chain_id)
        self.receipts = receipt_domain(service.domain)
        try:  # receipts are signed with the operator's key, when there is one
            with rpc_errors("finding the operator's account"):
                account: LocalAccount | None = operator_account(service.settings, service.w3)
        except ConfigError:
            account = None
        self.signer = None if account is None else ReceiptSigner(account, self.receipts)

    def get_extra(self, network: str) -> dict[str, Any] | None:
        """What a payee's requirements must carry so a payer can sign: the hub and its EIP-712 domain."""
        domain = self.service.domain
        return {"hub": domain.verifying_contract, "name": domain.name, "version": domain.version}

    def get_signers(self, network: str) -> list[str]:
        """Who signs this facilitator's receipts (a payment itself moves nothing on chain)."""
        return [] if self.signer is None else [self.signer.address]

    def verify(
        self, payload: PaymentPayload, requirements: PaymentRequirements, context: FacilitatorContext | None = None
    ) -> VerifyResponse:
        try:
            voucher, channel = self._voucher(payload, requirements)
            verdict = self._judged(lambda: self.service.ingestor.preview(voucher), channel)
        except Refused as refused:
            self._count("verify", refused.reason)
            return VerifyResponse(
                is_valid=False, invalid_reason=refused.reason, invalid_message=refused.message, payer=refused.payer
            )
        self._count("verify", "ok")
        return VerifyResponse(is_valid=True, payer=channel.payer, extra={"increment": str(verdict.receipt.increment)})

    def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, context: FacilitatorContext | None = None
    ) -> SettleResponse:
        try:
            voucher, channel = self._voucher(payload, requirements)
            verdict = self._judged(lambda: self._ingest(voucher), channel)
        except Refused as refused:
            return self._settle_refused(refused)
        return self._settled(verdict, channel)

    def serves(self, payload: PaymentPayload) -> bool:
        """Whether x402's facilitator would route this payment to this scheme (its scheme and network)."""
        return payload.accepted.scheme == SCHEME and payload.accepted.network == self.network

    async def settle_async(
        self,
        payload: PaymentPayload,
        requirements: PaymentRequirements,
        *,
        resend: bool = False,
        attempt: str | None = None,
    ) -> SettleResponse:
        """`settle` on the event loop: the commit is awaited without holding a thread (settlement.api.fastpath)."""
        (answer,) = await self.settle_many_async([(payload, requirements)], resend=resend, attempts=[attempt])
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def settle_many_async(
        self,
        payments: Sequence[tuple[PaymentPayload, PaymentRequirements]],
        *,
        resend: bool = False,
        attempts: Sequence[str | None] | None = None,
    ) -> list[SettleResponse | BaseException]:
        """`settle` for each payment, on the event loop, in order; in place of an answer, what a payment raised (the
        store or the chain down: a 503). The vouchers go to ingest together, as a voucher batch's do: one job for the
        writer, and their signers recovered by a worker process when there are many (inline on the event loop, each
        of a large batch held every other request ~60 µs), in the batch's order. Each channel this process has not
        seen is looked up once, on a worker thread (one lookup a payment, racing, could put a channel's payments out of
        order: an honest second payment judged first was refused as an overpayment). With `resend` (a payee's batch
        sent again after its answer was lost), a payment accepted before is answered as accepted, with its receipt:
        the first send's acceptance, whose answer the payee never read; unless another settle got it accepted: each
        payment's `attempt` (the payee's id of its settle, the same in its resend) is stored with the payment it gets
        accepted, and a resend of another attempt is the replay it was at its first send (`_another_attempt`)."""
        answers: dict[int, SettleResponse | BaseException] = {}
        checked: list[tuple[int, VoucherPayload, int, Parties | None]] = []
        for i, (payload, requirements) in enumerate(payments):
            try:
                parsed, price = self._checked(payload, requirements)
            except Refused as refused:
                answers[i] = self._settle_refused(refused)
                continue
            checked.append((i, parsed, price, self._parties.get(parsed.channel_id)))
        unknown = list(dict.fromkeys(parsed.channel_id for _, parsed, _, known in checked if known is None))
        lookups = (asyncio.to_thread(self._parties_of, channel_id) for channel_id in unknown)
        looked_up = dict(zip(unknown, await asyncio.gather(*lookups, return_exceptions=True), strict=True))
        priced: list[tuple[int, Voucher, Parties]] = []
        for i, parsed, price, known in checked:
            found = looked_up[parsed.channel_id] if known is None else known
            if isinstance(found, Refused):  # no such channel, or another shard's
                answers[i] = self._settle_refused(found)
            elif isinstance(found, BaseException):  # the chain down for its lookup: this payment's 503, not the others'
                answers[i] = found
            else:
                try:
                    attempt = None if attempts is None else attempts[i]
                    priced.append((i, self._priced(*payments[i], parsed, price, found, attempt), found))
                except Refused as refused:
                    answers[i] = self._settle_refused(refused)
                except Exception as ex:  # as an answer in its place, as every payment's failure
                    answers[i] = ex
        if priced:
            try:
                outcomes: list[Outcome | BaseException] = list(
                    await self.service.ingestor.ingest_async([voucher for _, voucher, _ in priced])
                )
            except Exception as ex:  # the store down: none of them was judged
                outcomes = [ex] * len(priced)
            resent: set[tuple[ChannelId, int]] = set()  # a resend's vouchers: the same one twice is one purchase
            for (i, voucher, channel), outcome in zip(priced, outcomes, strict=True):
                key = (voucher.channel_id, voucher.cumulative)
                first = resend and key not in resent and not _another_attempt(outcome, voucher.attempt)
                if first:
                    resent.add(key)
                answers[i] = self._answer(outcome, channel, first)
        return [answers[i] for i in range(len(payments))]

    def _answer(
        self, outcome: Outcome | BaseException, channel: Parties, resend: bool = False
    ) -> SettleResponse | BaseException:
        """A payment's answer from ingest's outcome: settled, refused with its reason, or what could not judge it."""
        if isinstance(outcome, BaseException) and not isinstance(outcome, SettlementError):
            return outcome
        try:
            verdict = self._judged(lambda: _verdict(outcome), channel, replayed_is_settled=resend)
        except Refused as refused:
            return self._settle_refused(refused)
        except SettlementError as ex:  # no refusal: the store's or the chain's 503
            return ex
        return self._settled(verdict, channel)

    def _settle_refused(self, refused: Refused) -> SettleResponse:
        self._count("settle", refused.reason)
        return SettleResponse(
            success=False,
            error_reason=refused.reason,
            error_message=refused.message,
            payer=refused.payer,
            transaction="",
            network=self.network,
        )

    def _settled(self, verdict: Verdict, channel: Parties) -> SettleResponse:
        self._count("settle", "ok")
        receipt = verdict.receipt
        return SettleResponse(
            success=True,
            payer=channel.payer,
            transaction="",  # nothing on chain yet: the engine settles the channel's latest voucher in a batch
            network=self.network,
            amount=str(receipt.increment),
            extra={"receipt": self._signed(receipt), "channel": _position(receipt)},
        )

    def _count(self, call: str, answer: str) -> None:
        self.service.metrics.x402_requests.labels(call, answer).inc()

    def _signed(self, receipt: Receipt) -> dict[str, str | None]:
        """The receipt, with the facilitator's EIP-712 signature over its fields (settlement.eip712.receipts)."""
        body = receipt_body(receipt)
        seconds = int(receipt.accepted_at.timestamp())
        body["acceptedAtSeconds"] = str(seconds)
        if self.signer is not None:
            fields = SignedFields(
                bytes.fromhex(receipt.channel_id[2:]),
                receipt.cumulative,
                receipt.increment,
                seconds,
                receipt.idempotency_key or "",
            )
            body["signature"] = "0x" + self.signer.sign(fields).hex()
            body["signer"] = self.signer.address
        return body

    def _ingest(self, voucher: Voucher) -> Verdict:
        (outcome,) = self.service.ingestor.ingest([voucher])
        return _verdict(outcome)

    def _judged(self, judge: Callable[[], Verdict], channel: Parties, *, replayed_is_settled: bool = False) -> Verdict:
        """Run the ledger; refusals become reasons, a replay too (unless `replayed_is_settled`: a resend). Store and
        chain failures propagate (503)."""
        try:
            verdict = judge()
        except RequestError as ex:
            raise Refused(ex.code, ex.message, channel.payer) from ex
        if not verdict.new and not replayed_is_settled:
            raise Refused(
                Reason.VOUCHER_REPLAYED,
                f"this voucher was accepted at {verdict.receipt.accepted_at.isoformat()} and bought its response "
                "then; a new payment needs a new voucher",
                channel.payer,
            )
        return verdict

    def _parties_of(self, channel_id: ChannelId) -> Parties:
        """Who pays whom in what on this channel: facts hashed into its id, so kept once read (no store read per
        payment on a channel this process has seen)."""
        known = self._parties.get(channel_id)
        if known is not None:
            return known
        try:  # as ingest admits an id it does not hold: found absent moments ago, or beyond the read budget (503)
            channel = self.service.ingestor.admit_channel(channel_id)
        except (ChannelNotFoundError, WrongShardError) as ex:  # absent, or another shard's payer
            raise Refused(ex.code, ex.message) from ex
        with self._parties_lock:
            if len(self._parties) >= PARTIES_KEPT:
                self._parties.clear()
            known = self._parties[channel_id] = Parties(channel.payer, channel.payee, channel.token)
        return known

    def _voucher(self, payload: PaymentPayload, requirements: PaymentRequirements) -> tuple[Voucher, Parties]:
        """The payment as a priced voucher, after every check that needs no ledger: the scheme, the network, the
        requirements the payment answers, the payload's form, the channel's payee and asset."""
        parsed, price = self._checked(payload, requirements)
        channel = self._parties_of(parsed.channel_id)
        return self._priced(payload, requirements, parsed, price, channel), channel

    def _checked(self, payload: PaymentPayload, requirements: PaymentRequirements) -> tuple[VoucherPayload, int]:
        """The checks that need neither the channel nor the ledger; the payload parsed, and the price."""
        accepted = payload.accepted
        if requirements.scheme != SCHEME or requirements.network != self.network:
            raise Refused(Reason.UNSUPPORTED, f"this facilitator serves {SCHEME} on {self.network} only")
        if not answers(accepted, requirements):
            raise Refused(Reason.REQUIREMENTS_MISMATCH, "the payment answers other requirements than the payee's")
        price = base_units(requirements.amount)
        if price is None:
            raise Refused(Reason.REQUIREMENTS_MISMATCH, "the requirements' amount is not a positive integer")
        try:
            return VoucherPayload.parse(payload.payload), price
        except PayloadError as ex:
            raise Refused(ex.reason, str(ex)) from ex

    def _priced(
        self,
        payload: PaymentPayload,
        requirements: PaymentRequirements,
        parsed: VoucherPayload,
        price: int,
        channel: Parties,
        attempt: str | None = None,
    ) -> Voucher:
        """The channel's payee and asset checked against the requirements; the voucher with its price, its key and
        the payee's settle `attempt`."""
        if not same_address(channel.payee, requirements.pay_to):
            raise Refused(Reason.WRONG_PAY_TO, f"channel {parsed.channel_id} pays {channel.payee}", channel.payer)
        if not same_address(channel.token, requirements.asset):
            asset = "ETH" if channel.token == ETH else channel.token
            raise Refused(Reason.WRONG_ASSET, f"channel {parsed.channel_id} is in {asset}", channel.payer)
        return Voucher(
            parsed.channel_id,
            parsed.cumulative,
            parsed.signature,
            idempotency_key=_payment_id(payload),
            price=price,
            attempt=attempt,
        )


def _verdict(outcome: Outcome) -> Verdict:
    """Ingest's outcome for one voucher: the verdict, or its refusal raised."""
    if isinstance(outcome, SettlementError):
        raise outcome
    return outcome


def _another_attempt(outcome: Outcome | BaseException, attempt: str | None) -> bool:
    """Whether the voucher was accepted before by another settle than the payee's `attempt` (stored with the payment:
    whichever `serve` process took it, and after a restart). A settle or a payment that names none is judged as
    before."""
    if attempt is None or not isinstance(outcome, Verdict):
        return False
    return outcome.receipt.attempt is not None and outcome.receipt.attempt != attempt


def _payment_id(payload: PaymentPayload) -> str | None:
    """The payment-identifier extension's id (16-128 characters) as the payment's idempotency key (64 at most: a
    longer id is kept as its SHA-256). An id that fails the extension's own rules counts as none."""
    found = payment_identifier(payload)
    if found is None:
        return None
    return found if len(found) <= IDEMPOTENCY_KEY_MAX else hashlib.sha256(found.encode()).hexdigest()


def _position(receipt: Receipt) -> dict[str, str]:
    """Where the channel stands after this payment: what the payer's next voucher builds on (the deposit it was
    judged against is what remains over the cumulative amount)."""
    return {
        "deposit": str(receipt.cumulative + receipt.remaining),
        "cumulativeAmount": str(receipt.cumulative),
        "remaining": str(receipt.remaining),
    }


def x402_facilitator(scheme: ChannelHubFacilitator) -> x402FacilitatorSync:
    """x402's facilitator with our scheme registered for this deployment's network, and no hooks: the fast path
    (settlement.api.fastpath) hands our scheme's settlements to it directly, as this facilitator would. It lists
    `SETTLE_ATTEMPT` in `/supported`: a payee sends each settle's `attempt` to a facilitator that keeps it."""
    facilitator = x402FacilitatorSync()
    facilitator.register([scheme.network], scheme)
    facilitator.register_extension(FacilitatorExtension(key=SETTLE_ATTEMPT))
    return facilitator
