"""Routes that read channels, payments and payee totals. Plain `def`: they block on the store, so FastAPI runs them
on its worker threads."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from settlement.api.auth import CallerDep, require_party
from settlement.api.deps import (
    ADMITTED,
    ERRORS,
    AddressPath,
    AddressQuery,
    ChannelIdPath,
    Limit,
    ServiceDep,
    checked_address,
)
from settlement.api.schemas import (
    AssetOut,
    ChannelOut,
    ChannelPage,
    PayeeSummaryOut,
    PaymentPage,
    ReceiptOut,
    StrictModel,
)
from settlement.chain.node import rpc_errors
from settlement.domain.model import Channel, ChannelId, ChannelStatus, utcnow
from settlement.errors import ChainError, ChannelNotFoundError, ForbiddenError
from settlement.server.service import Service
from settlement.store import channels as channel_q
from settlement.store.payees import payee_book

router = APIRouter(responses=ERRORS)


@router.get("/v1/channels/{channelId}", operation_id="getChannel", tags=["channels"])
async def get_channel(channelId: ChannelIdPath, request: Request, service: ServiceDep, who: CallerDep) -> ChannelOut:
    """One channel: the chain's confirmed facts and the latest accepted voucher (looked up on chain if new). Its
    payer's, its payee's and the operator's."""
    channel_id = ChannelId(channelId.lower())
    if getattr(request.state, ADMITTED, None) != channel_id:  # the fast path admits anonymous reads itself
        service.ingestor.admit_unknown(channel_id)  # a made-up id is refused here, before a thread or the store
    channel = await run_in_threadpool(service.ingestor.load_channel, channel_id)  # another shard's: 421
    require_party(who, channel.payer, channel.payee, "a channel")
    return ChannelOut.of(channel)


class StopIn(StrictModel):
    """A stop names nothing but its channel (a JSON body, as every POST of this API has one)."""


@router.post("/v1/channels/{channelId}/stop", operation_id="stopChannel", tags=["channels"])
async def stop_channel(channelId: ChannelIdPath, _: StopIn, service: ServiceDep, who: CallerDep) -> ChannelOut:
    """Stop a channel at the service (body `{}`), so that its payee can close it on chain (`closeByPayee`) with the
    latest voucher: no voucher is accepted after this answer, which carries that voucher (every one accepted before
    it is settled by the close; without the stop, those accepted until the service saw the close never could be).
    Its payee's and the operator's; final (its payer pays on another channel); a second stop answers the same."""
    channel_id = ChannelId(channelId.lower())
    service.ingestor.admit_unknown(channel_id)  # a made-up id is refused here, before a thread or the store
    channel = await run_in_threadpool(service.ingestor.load_channel, channel_id)  # another shard's: 421
    if not (who.is_operator or who.is_payee(channel.payee)):
        raise ForbiddenError("a channel is stopped by its payee (to close it) and the operator only")
    if channel.stopped_at_us is not None:  # read after the stop committed: final, so no write again (a flood of
        return ChannelOut.of(channel)  # stops would otherwise take SQLite's write lock from ingest each time)
    return ChannelOut.of(await run_in_threadpool(_stop, service, channel_id))


def _stop(service: Service, channel_id: ChannelId) -> Channel:
    with service.db.write() as conn:
        stopped = channel_q.stop_channel(conn, channel_id, utcnow())
    if stopped is None:  # load_channel stored it: the store lost it since
        raise ChannelNotFoundError(f"the service has no channel {channel_id}")
    return stopped


@router.get("/v1/channels", operation_id="listChannels", tags=["channels"])
def list_channels(
    service: ServiceDep,
    who: CallerDep,
    payer: AddressQuery = None,
    payee: AddressQuery = None,
    status: Literal["open", "closing", "closed"] | None = None,
    cursor: Annotated[str | None, Query(pattern=r"^0x[0-9a-f]{64}$")] = None,
    limit: Limit = 100,
) -> ChannelPage:
    """Channels the service knows, in id order; pass `nextCursor` back as `cursor` for the next page. A payer or a
    payee names itself as `payer` or `payee`; the operator lists any."""
    payer, payee = checked_address(payer, "payer"), checked_address(payee, "payee")
    if not (who.is_operator or (payer and who.is_payer(payer)) or (payee and who.is_payee(payee))):
        raise ForbiddenError("name yourself as `payer` or `payee`: only the operator lists every party's channels")
    with service.db.read() as conn:
        page = channel_q.list_channels(
            conn,
            payer=payer,
            payee=payee,
            status=ChannelStatus[status.upper()] if status else None,
            after=cursor,
            limit=limit,
        )
    return ChannelPage(items=[ChannelOut.of(c) for c in page.items], nextCursor=page.next_cursor)


@router.get("/v1/channels/{channelId}/payments", operation_id="listPayments", tags=["channels"])
def list_payments(
    channelId: ChannelIdPath,
    service: ServiceDep,
    who: CallerDep,
    cursor: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="the previous page's nextCursor (a payment id)")
    ] = None,
    limit: Limit = 100,
) -> PaymentPage:
    """Every accepted increment of a channel, newest first (with the payer's references: its payer's, its payee's and
    the operator's)."""
    channel_id = channelId.lower()
    with service.db.read() as conn:
        channel = channel_q.get_channel(conn, channel_id)
        if channel is None:
            raise ChannelNotFoundError(f"the service has no channel {channel_id}")
        require_party(who, channel.payer, channel.payee, "a channel's payments")
        page = channel_q.list_payments(conn, channel_id, before=cursor, limit=limit)
    return PaymentPage(items=[ReceiptOut.of(r) for r in page.items], nextCursor=page.next_cursor)


@router.get("/v1/payees/{address}/summary", operation_id="getPayeeSummary", tags=["channels"])
def payee_summary(address: AddressPath, service: ServiceDep, who: CallerDep) -> PayeeSummaryOut:
    """What a payee was paid, per asset: accepted by the service, settled on chain, the difference, what the hub
    holds for it (`withdrawable`, read from the chain at the block the other figures are current to, once per block:
    `HubBalances`; null when the chain does not answer) and what it already withdrew (confirmed `Withdrawn`
    events). Unsettled value becomes withdrawable with the next batch, every `settleInterval` seconds of the running
    engine."""
    payee = checked_address(address, "address")
    assert payee is not None
    if not (who.is_operator or who.is_payee(payee)):
        raise ForbiddenError("a payee's summary is read by that payee and the operator only")
    with service.db.read() as conn:
        book = payee_book(conn, payee)
    # A payer picks its channel's token: a payee paid in a thousand tokens of payers' making cost a thousand RPC calls
    # a summary (each new block), on one of the few request threads. ETH's and the priced tokens' balances first.
    priced = service.settings.priced_assets
    ranked = sorted(book.assets, key=lambda totals: totals.token not in priced)
    asked = {totals.token for totals in ranked[: service.settings.summary_balances_max]}
    rows = [
        AssetOut.of(
            totals,
            withdrawable=_hub_balance(service, payee, totals.token, book.as_of_block, book.as_of_hash)
            if totals.token in asked
            else None,
            withdrawn=book.withdrawn.get(totals.token, 0),
        )
        for totals in book.assets
    ]
    unread = [totals.token for totals in book.assets if totals.token not in asked]
    return PayeeSummaryOut(payee=payee, settleInterval=book.settle_interval, assets=rows, balancesUnread=unread)


def _hub_balance(service: Service, account: str, token: str, block: int | None, block_hash: str | None) -> int | None:
    """At the block the store's facts are current to, so that `withdrawable` agrees with `settled` and `withdrawn`
    (a batch mined but not yet confirmed shows in none of them)."""
    try:
        with rpc_errors("reading a hub balance"):
            return service.balances.at(account, token, block or None, block_hash)
    except ChainError:
        return None
