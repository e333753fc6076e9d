"""Store versus chain, per channel: the operator's proof that the service's books match the hub's.

The indexer is caught up first and the chain is read at the very block the store is current to, so any difference
in deposit, settled amount or status is a real discrepancy, unless the channel is suspended after a deep reorg
(explained: an operator must look anyway). Accepted but unsettled value is pending work while the channel can still
be settled, not a mismatch; on a channel the chain has closed it can never be paid, and is reported whatever the
store believes the channel's status to be. The chain having settled more than the service ever accepted is one too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from settlement.domain.model import Channel, ChannelStatus
from settlement.indexer.follower import Indexer
from settlement.store import Database
from settlement.store import channels as channel_q
from settlement.store import settlements as batch_q


@dataclass(frozen=True)
class Row:
    channel_id: str
    status: str
    accepted: int
    settled_store: int
    settled_chain: int | None
    deposit_store: int
    deposit_chain: int | None
    in_flight: bool
    problem: str | None
    explained: bool

    def as_json(self) -> dict[str, Any]:
        """camelCase as the API's bodies are; amounts as decimal strings; `explained` only where there is a problem."""
        out = {
            _camel(k): str(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in asdict(self).items()
        }
        if self.problem is None:
            out["explained"] = None
        return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def reconcile(db: Database, indexer: Indexer) -> tuple[int, list[Row]]:
    """(the block compared at, one row per channel)."""
    indexer.catch_up()
    block = indexer.progress.cursor if indexer.progress else indexer.start_block - 1
    with db.read() as conn:
        stored = channel_q.list_channels(conn, limit=10**9).items
        busy = {e.channel_id for b in batch_q.open_batches(conn) for e in batch_q.entries_of(conn, b.batch_id)}
    return block, [_row(c, indexer.read_channel(c.channel_id, block, c.salt), c.channel_id in busy) for c in stored]


def _row(store: Channel, chain: Channel | None, in_flight: bool) -> Row:
    problems = []
    if chain is None:
        problems.append("not on chain")
    else:
        if chain.deposit != store.deposit:
            problems.append("deposit differs")
        if chain.settled != store.settled:
            problems.append("settled differs")
        if chain.status != store.status:
            problems.append("status differs")
        if chain.settled > store.accepted:
            problems.append("chain settled more than the service accepted")
        if chain.status == ChannelStatus.CLOSED and store.accepted > chain.settled:
            problems.append(f"closed with {store.accepted - chain.settled} accepted but never settled")
    return Row(
        channel_id=store.channel_id,
        status=store.status.name.lower(),
        accepted=store.accepted,
        settled_store=store.settled,
        settled_chain=None if chain is None else chain.settled,
        deposit_store=store.deposit,
        deposit_chain=None if chain is None else chain.deposit,
        in_flight=in_flight,
        problem="; ".join(problems) or None,
        explained=bool(problems) and store.suspended_reason is not None,
    )
