"""The one error tree of the service; every error carries an HTTP status and a stable machine-readable code.

    SettlementError                  500 internal_error
    ├── ConfigError                  500 config_invalid
    │   └── PortInUseError           500 port_in_use         (the API's port is taken)
    ├── ArtifactError                500 artifact_invalid
    │   └── SourceDriftError         500 artifact_source_drift
    ├── DevnetError                  500 devnet_failed
    ├── DeploymentError              500 deployment_missing
    ├── StoreError                   500 store_error
    │   ├── ChannelMovedError        503 channel_moved       (ingest writer only, never answered: a held copy is stale)
    │   └── StoreUnavailableError    503 store_unavailable
    │       ├── UnknownChannelsBusyError 503 unknown_channels_busy (channel ids not in memory over the read budget)
    │       └── UnknownKeysBusyError 503 unknown_keys_busy (API keys not in memory over the read budget)
    ├── StreamsFullError             503 streams_full        (this process serves SETTLEMENT_EVENT_STREAMS_MAX live
    │                                                   streams of payee events already, or payees of no channel
    │                                                   their share)
    ├── WebhooksFullError            503 webhooks_full       (the service holds SETTLEMENT_WEBHOOKS_MAX live webhooks,
    │                                                   or payees of no channel their share)
    ├── CapsFullError                503 caps_full           (the service holds SETTLEMENT_CAPS_MAX spending caps, or
    │                                                   payees of no channel their share)
    ├── LookUpsBusyError             503 lookups_busy        (every thread looking up new webhooks' hosts is taken)
    ├── EngineBusyError              409 engine_busy         (another process runs the settlement engine)
    ├── NothingToWithdrawError       409 balance_insufficient (the hub holds less than a withdrawal asks)
    ├── ChainError                   502 chain_error
    │   ├── ChainUnavailableError    503 chain_unavailable
    │   │   └── LookupBudgetError    503 chain_lookups_exhausted (unknown channel ids over the look-up budget)
    │   ├── ChainMismatchError       503 chain_mismatch      (the RPC serves another chain instance than the store's)
    │   └── TransactionFailedError   502 transaction_failed
    ├── ServiceRejectedError         the service's status and code, as the client SDK received them; the SDK raises
    │                                the class above or below with that code, made a subclass of this one
    ├── PaymentUncertainError        503 payment_uncertain   (client SDK: no answer after every retry)
    ├── UntrustedServiceError        502 service_untrusted   (client SDK: the service's word failed a check)
    ├── WaitTimeoutError             504 wait_timeout        (client SDK: a wait ended; carries the last answer)
    ├── BudgetExceededError          403 budget_exceeded     (client SDK: a payment would pass a spend budget)
    └── RequestError                 400 bad_request         (the client's fault: always 4xx)
        ├── MalformedRequestError    400 malformed_request
        ├── UnsupportedMediaError    415 unsupported_media_type
        ├── PayloadTooLargeError     413 payload_too_large
        ├── RequestTimeoutError      408 request_timeout     (the body came too slowly)
        ├── HostNotAllowedError      400 host_not_allowed    (a Host header not in SETTLEMENT_ALLOWED_HOSTS)
        ├── AuthenticationRequiredError 401 authentication_required (a read that needs credentials came without)
        │   └── InvalidCredentialsError 401 invalid_credentials (an unknown, revoked or expired key or token; a
        │                                                   sign-in whose message or signature does not hold)
        ├── ForbiddenError           403 forbidden           (another party's data, or an operator's route)
        ├── WebhookLimitError        409 webhook_limit       (a payee has SETTLEMENT_WEBHOOKS_PER_PAYEE already)
        ├── CapLimitError            409 cap_limit           (a payee, or "*", has SETTLEMENT_CAPS_PER_PAYEE already)
        ├── StreamLimitError         429 stream_limit        (an account holds SETTLEMENT_EVENT_STREAMS_PER_ACCOUNT
        │                                                   live streams of this process already)
        ├── RateLimitedError         429 rate_limited        (one client over SETTLEMENT_CLIENT_REQUESTS_PER_SECOND)
        │   └── PayerRateLimitedError 429 payer_rate_limited (one payer's signed vouchers over
        │                                                   SETTLEMENT_PAYER_VOUCHERS_PER_SECOND, every channel)
        ├── BatchTooLargeError       413 batch_too_large
        ├── RefundRequestExpiredError 400 refund_request_expired (a payer's refund request past its expiry, or
        │                                                   valid for longer than the payee allows)
        ├── NotFoundError            404 not_found
        ├── MethodNotAllowedError    405 method_not_allowed
        └── VoucherRejectedError     400 voucher_rejected    (a well-formed voucher the ledger refuses)
            ├── InvalidSignatureError      400 invalid_signature
            ├── AmountOutOfRangeError      400 amount_out_of_range
            ├── ChannelNotFoundError       404 channel_not_found
            ├── WrongShardError            421 wrong_shard      (the channel's payer belongs to another shard of a
            │                                                   sharded deployment: `shard` names it)
            ├── ChannelUnconfirmedError    409 channel_unconfirmed
            ├── ChannelClosedError         409 channel_closed
            ├── ChannelSuspendedError      409 channel_suspended
            ├── ChannelHeldError           409 channel_held     (the operator holds the channel: a risk rule)
            ├── IncrementTooSmallError     409 increment_too_small (below the operator's least increment per asset)
            ├── SpendingCapError           409 spending_cap_reached (a payee's or the operator's cap on what a payer
            │                                                   may spend in a window; Retry-After: its end)
            ├── StaleVoucherError          409 stale_voucher
            ├── AmountExceedsDepositError  409 amount_exceeds_deposit
            ├── UnderpaymentError          409 underpayment     (a priced voucher pays less than its price)
            ├── OverpaymentError           409 overpayment      (a priced voucher pays more: a stale position)
            ├── IdempotencyKeyReusedError  409 idempotency_key_reused   (the key paid another amount on the channel)
            └── ExistsWithDifferentMetadataError 409 exists_with_different_metadata (accepted before, other metadata)

Lower-level exceptions are wrapped at the boundary (`raise ArtifactError(...) from ex`) so callers catch one root.
Codes are part of the API: never rename one, add a new class instead.
"""

from __future__ import annotations

from typing import Self


class SettlementError(Exception):
    """Root of every error this package raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details  # machine-readable context for the response body, e.g. the current cumulative

    def body(self) -> dict[str, object]:
        """The JSON error body of the API: a stable code, a message for people, and any details."""
        return {"code": self.code, "message": self.message, **self.details}

    @property
    def retry_after(self) -> int | None:
        """The whole seconds its `retryAfter` detail says to wait before asking again (a 429, a busy budget), if it
        says so: for the API's Retry-After header and for a client reading a refusal alike."""
        wait = self.details.get("retryAfter")
        return wait if isinstance(wait, int) and not isinstance(wait, bool) else None

    def detached(self) -> Self:
        """This error without its traceback, to keep as an outcome or to answer: the traceback holds the frames that
        hold the error (a local, an outcome list), a reference cycle per refusal that only the garbage collector
        frees, in pauses every request waits for (a flood's refusals made them up to 35 ms)."""
        return self.with_traceback(None)


class ConfigError(SettlementError, ValueError):
    """A setting is missing or unusable."""

    code = "config_invalid"


class PortInUseError(ConfigError):
    """The port the API (or the devnet) should listen on is taken by another process."""

    code = "port_in_use"


class NothingToWithdrawError(SettlementError):
    """The hub holds less for the account than it asked to withdraw (nothing at all, often: payments are credited
    only when the engine settles them)."""

    status = 409
    code = "balance_insufficient"


class ArtifactError(SettlementError):
    """A shipped contract artifact cannot be loaded or does not fit."""

    code = "artifact_invalid"


class SourceDriftError(ArtifactError):
    """A contract source differs from the one the artifact was compiled from."""

    code = "artifact_source_drift"


class DevnetError(SettlementError):
    """The local anvil devnet could not be started or stopped."""

    code = "devnet_failed"


class DeploymentError(SettlementError):
    """No usable deployment record for the configured chain."""

    code = "deployment_missing"


class EngineBusyError(SettlementError):
    """Another process (a running `settlement serve`) holds the settlement engine's lease on this store: it is the
    one that settles; a second engine would race it for the same nonces."""

    status = 409
    code = "engine_busy"


class ChainError(SettlementError):
    """The chain answered, but not as expected."""

    status = 502
    code = "chain_error"


class ChainUnavailableError(ChainError):
    """No configured RPC endpoint answers."""

    status = 503
    code = "chain_unavailable"


class LookupBudgetError(ChainUnavailableError):
    """More channel ids this service has not seen are being looked up on chain than the look-up budget allows
    (SETTLEMENT_CHAIN_LOOKUPS_PER_SECOND): a flood of unknown ids costs a bounded number of RPC calls; retry."""

    status = 503
    code = "chain_lookups_exhausted"


class ChainMismatchError(ChainError):
    """The RPC serves another chain instance than the one the store or the deployment record belongs to: the
    deployment block is gone or has another hash (a restarted devnet that redeployed at the same address, a fork)."""

    status = 503
    code = "chain_mismatch"


class SettlerUnfundedError(ChainError):
    """The settler's ETH does not cover a batch's gas: the batch waits in the store until it does."""

    code = "settler_unfunded"


class TransactionFailedError(ChainError):
    """A transaction reverted or was never mined."""

    code = "transaction_failed"


class StoreError(SettlementError):
    """The database refused an operation it should have accepted."""

    code = "store_error"


class ChannelMovedError(StoreError):
    """A channel the ingest writer judged against its own copy was written since, or another transaction holds its
    row: the writer rolls the group back and writes it again under row locks. It never reaches a client."""

    status = 503
    code = "channel_moved"


class StoreUnavailableError(StoreError):
    """The database cannot be reached or is busy; nothing was acknowledged."""

    status = 503
    code = "store_unavailable"


class UnknownChannelsBusyError(StoreUnavailableError):
    """More channel ids this process does not hold in memory are asked for than the read budget allows
    (SETTLEMENT_UNKNOWN_CHANNEL_READS_PER_SECOND): a flood of made-up ids costs the store and the chain a bounded
    amount, and known channels go on. Retry after a second."""

    code = "unknown_channels_busy"


class UnknownKeysBusyError(StoreUnavailableError):
    """More API keys this process does not hold are presented than the read budget allows
    (SETTLEMENT_UNKNOWN_KEY_READS_PER_SECOND): a flood of made-up keys costs the store a bounded amount. A key made a
    moment ago by `settlement keys create` works after a retry a second later."""

    code = "unknown_keys_busy"


class StreamsFullError(SettlementError):
    """This process serves as many live streams of payee events as SETTLEMENT_EVENT_STREAMS_MAX allows: each holds a
    connection and reads the store when the feed moves, so their number is bounded. Retry later, or another process;
    webhooks deliver the same events without a stream."""

    status = 503
    code = "streams_full"


class WebhooksFullError(SettlementError):
    """The service holds as many live webhooks as SETTLEMENT_WEBHOOKS_MAX allows: its sender reads each one's row at
    every tick, and making one needs nothing but a key, so their number is bounded. The operator may raise it."""

    status = 503
    code = "webhooks_full"


class CapsFullError(SettlementError):
    """The service holds as many spending caps as SETTLEMENT_CAPS_MAX allows, or payees of no channel hold their share
    (SETTLEMENT_CAPS_WITHOUT_CHANNELS): every process reads every cap four times a second and holds them all, and
    making one needs nothing but a key, so their number is bounded. The operator may raise it."""

    status = 503
    code = "caps_full"


class LookUpsBusyError(SettlementError):
    """Every thread that looks up new webhooks' hosts is waiting for a resolver: a look-up cannot be cancelled, so
    hosts in a zone that answers slowly (an attacker's own) hold them until it answers. A webhook asked for meanwhile
    is refused at once, retryable, instead of waiting behind them and being told its own host did not resolve."""

    status = 503
    code = "lookups_busy"


class RequestError(SettlementError):
    """The request is wrong; retrying it unchanged gives the same answer."""

    status = 400
    code = "bad_request"


class MalformedRequestError(RequestError):
    """The body or a parameter does not have the documented shape."""

    code = "malformed_request"


class UnsupportedMediaError(RequestError):
    """The body is not JSON."""

    status = 415
    code = "unsupported_media_type"


class PayloadTooLargeError(RequestError):
    """The body is larger than the configured limit."""

    status = 413
    code = "payload_too_large"


class RequestTimeoutError(RequestError):
    """The request's body did not arrive in time (SETTLEMENT_BODY_TIMEOUT_SECONDS)."""

    status = 408
    code = "request_timeout"


class HostNotAllowedError(RequestError):
    """The request's Host is not one this service answers to (SETTLEMENT_ALLOWED_HOSTS): DNS rebinding, or a name
    the operator did not list."""

    status = 400
    code = "host_not_allowed"


class AuthenticationRequiredError(RequestError):
    """A route that needs a caller's credentials (docs/security.md) was asked without any."""

    status = 401
    code = "authentication_required"


class InvalidCredentialsError(AuthenticationRequiredError):
    """Credentials were given and do not hold: an unknown or revoked API key, an expired or forged token, a sign-in
    message this service did not issue, or a signature by another account."""

    code = "invalid_credentials"


class ForbiddenError(RequestError):
    """The caller is known, and this is another party's data or an operator's route."""

    status = 403
    code = "forbidden"


class WebhookLimitError(RequestError):
    """A payee asked for one webhook more than SETTLEMENT_WEBHOOKS_PER_PAYEE."""

    status = 409
    code = "webhook_limit"


class CapLimitError(RequestError):
    """A payee (or the operator's "every payee") asked for one spending cap more than SETTLEMENT_CAPS_PER_PAYEE: every
    cap is held by every process and checked for every payment, so their number is bounded."""

    status = 409
    code = "cap_limit"


class StreamLimitError(RequestError):
    """An account opened one live stream of payee events more than SETTLEMENT_EVENT_STREAMS_PER_ACCOUNT on this
    process (signing in is free: without the limit one key could take every stream the process serves)."""

    status = 429
    code = "stream_limit"


class RateLimitedError(RequestError):
    """One client (its address, or the one a trusted proxy names) sent more requests than its rate allows; the
    answer carries Retry-After. Other clients are not slowed."""

    status = 429
    code = "rate_limited"


class PayerRateLimitedError(RateLimitedError):
    """One payer signed more vouchers a second, over all its channels and all clients, than its rate allows (only
    vouchers its own key signed count: nobody else can spend a payer's rate). The answer carries Retry-After."""

    code = "payer_rate_limited"


class BatchTooLargeError(RequestError):
    """A batch holds more items than the configured limit."""

    status = 413
    code = "batch_too_large"


class RefundRequestExpiredError(RequestError):
    """A payer's signed refund request (settlement.x402.refunds) has expired, or names an expiry further ahead than
    the payee accepts (a request captured now must not stay usable for long); sign a fresh one."""

    code = "refund_request_expired"


class NotFoundError(RequestError):
    """No such route or resource."""

    status = 404
    code = "not_found"


class MethodNotAllowedError(RequestError):
    """The route exists, but not for this method."""

    status = 405
    code = "method_not_allowed"


class VoucherRejectedError(RequestError):
    """A well-formed voucher that the acceptance rules refuse."""

    code = "voucher_rejected"


class InvalidSignatureError(VoucherRejectedError):
    """The signature does not recover to the channel's payer (or is not a signature the hub accepts)."""

    code = "invalid_signature"


class AmountOutOfRangeError(VoucherRejectedError):
    """The cumulative amount is 0 or not below 2^256."""

    code = "amount_out_of_range"


class ChannelNotFoundError(VoucherRejectedError):
    """No channel with this id exists on chain."""

    status = 404
    code = "channel_not_found"


class WrongShardError(VoucherRejectedError):
    """The channel's payer belongs to another shard (SETTLEMENT_SHARD of SETTLEMENT_SHARDS): its vouchers are taken
    only by that shard's service, so no voucher is ever accepted in two stores. Send it there (`shard`)."""

    status = 421
    code = "wrong_shard"


class ChannelUnconfirmedError(VoucherRejectedError):
    """The channel exists on chain but does not have enough confirmations yet; retry shortly."""

    status = 409
    code = "channel_unconfirmed"


class ChannelClosedError(VoucherRejectedError):
    """The channel is closed, or closing with too little time left to settle a new voucher."""

    status = 409
    code = "channel_closed"


class ChannelSuspendedError(VoucherRejectedError):
    """A chain reorganisation deeper than the confirmation depth touched the channel; an operator must look."""

    status = 409
    code = "channel_suspended"


class ChannelHeldError(VoucherRejectedError):
    """The operator holds this channel (a risk rule): no voucher is accepted on it until released."""

    status = 409
    code = "channel_held"


class SpendingCapError(VoucherRejectedError):
    """The voucher would take what its payer spent in the current window past a spending cap (one a payee set on its
    channels, or the operator's); the window's end is when it may pay again."""

    status = 409
    code = "spending_cap_reached"


class IncrementTooSmallError(VoucherRejectedError):
    """The voucher adds less than the operator's least increment for the channel's asset (dust)."""

    status = 409
    code = "increment_too_small"


class StaleVoucherError(VoucherRejectedError):
    """The cumulative amount is not above what the channel already accepted; the body carries the current value."""

    status = 409
    code = "stale_voucher"


class AmountExceedsDepositError(VoucherRejectedError):
    """The cumulative amount is above the channel's confirmed deposit."""

    status = 409
    code = "amount_exceeds_deposit"


class UnderpaymentError(VoucherRejectedError):
    """A voucher that must pay a price (an x402 payment) pays less over the channel's position than the price: with
    other vouchers accepted meanwhile, its cumulative amount no longer covers it."""

    status = 409
    code = "underpayment"


class OverpaymentError(VoucherRejectedError):
    """A voucher that must pay a price pays more over the channel's position than the price: the payer signed from a
    position the service never accepted (a payment that was not charged). It is refused so the payer is never
    charged for what it did not get; the payer re-reads the position (`currentCumulativeAmount`) and signs again."""

    status = 409
    code = "overpayment"


class ServiceRejectedError(SettlementError):
    """The settlement service answered a client request with an error; status and code are the service's.

    The payer SDK raises the very class the service raised, as a subclass of this one (see `rejected`): an app can
    catch `StaleVoucherError` or `AmountExceedsDepositError` by name, or every refusal as ServiceRejectedError.
    `request` says which call it answered ("POST /v1/vouchers").
    """

    def __init__(self, status: int, code: str, message: str, *, request: str = "", **details: object) -> None:
        super().__init__(message, **details)
        self.status = status
        self.code = code
        self.request = request


_ANSWERED: dict[type[SettlementError], type[ServiceRejectedError]] = {}


def rejected(status: int, code: str, message: str, *, request: str = "", **details: object) -> ServiceRejectedError:
    """The client-side error for a service's answer: the class of the tree with that code (also a
    ServiceRejectedError), or ServiceRejectedError itself for a code this version does not know."""
    known = _by_code().get(code)
    if known is None:
        return ServiceRejectedError(status, code, message, request=request, **details)
    answered = _ANSWERED.get(known)
    if answered is None:
        answered = type(known.__name__, (ServiceRejectedError, known), {"__doc__": known.__doc__})
        _ANSWERED[known] = answered
    return answered(status, code, message, request=request, **details)


def _by_code() -> dict[str, type[SettlementError]]:
    found: dict[str, type[SettlementError]] = {}
    pending: list[type[SettlementError]] = [SettlementError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls not in _ANSWERED.values() and cls is not ServiceRejectedError and "code" in vars(cls):
            found.setdefault(str(vars(cls)["code"]), cls)
    return found


class PaymentUncertainError(SettlementError):
    """A voucher was sent but no answer came back after every retry: it may or may not have been accepted.

    Pay again with the idempotency key in `details["idempotencyKey"]`: the SDK re-sends the same voucher, so it ends
    with exactly one payment.
    """

    status = 503
    code = "payment_uncertain"


class WaitTimeoutError(SettlementError, TimeoutError):
    """What the SDK waited for did not happen in time. `details` carry the service's last answer (`lastCode`,
    `lastMessage`), which usually says why: e.g. `channel_unconfirmed` while a deposit is not yet deep enough."""

    status = 504
    code = "wait_timeout"


class BudgetExceededError(SettlementError, ValueError):
    """The payer SDK would go over one of the app's spend budgets (a limit per rolling period): nothing was signed."""

    status = 403
    code = "budget_exceeded"


class IdempotencyKeyReusedError(VoucherRejectedError):
    """The idempotency key already paid a different amount on this channel: a new payment needs a new key."""

    status = 409
    code = "idempotency_key_reused"


class ExistsWithDifferentMetadataError(VoucherRejectedError):
    """This voucher was accepted before with another reference or idempotency key (TigerBeetle's "exists with
    different ..."): the payment stands, as first submitted; the body carries the stored receipt."""

    status = 409
    code = "exists_with_different_metadata"


class UntrustedServiceError(SettlementError):
    """The payer SDK could not check what the service said (a position without the payer's own voucher, a hub
    without ChannelHub's code or with another domain): it refuses to sign or send value on that word."""

    status = 502
    code = "service_untrusted"
