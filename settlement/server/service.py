"""Wiring: one deployment's store, chain connection, indexer, ingest pipeline and settlement engine, with their
background threads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
from sqlalchemy import Connection
from web3 import Web3
from web3.contract import Contract

from settlement.chain.balances import HubBalances
from settlement.chain.deployment import Deployment, hub_contract
from settlement.chain.node import connect, is_devnet
from settlement.chain.provider import FailoverProvider
from settlement.domain.shards import Shard
from settlement.eip712.vouchers import Domain, VoucherVerifier, read_domain
from settlement.errors import ConfigError, SettlementError
from settlement.indexer.follower import Indexer
from settlement.ingest.admission import ForgeryBudgets, PayerRates
from settlement.ingest.pipeline import Ingestor
from settlement.server.access import SignIn
from settlement.server.api_keys import KeyDirectory, Role
from settlement.server.config import Settings
from settlement.server.event_streams import EventStreams
from settlement.server.metrics import Metrics
from settlement.server.metrics_port import MetricsPort
from settlement.server.operator import operator_account
from settlement.server.payee_events import Horizon
from settlement.server.risk import RiskMonitor
from settlement.server.webhooks import HostLookUps, WebhookSender
from settlement.settle.engine import Settler
from settlement.settle.lease import Lease
from settlement.store import Database
from settlement.store.keys import has_live_key
from settlement.store.meta import bind_deployment, signin_secret
from settlement.store.retention import compact

logger = logging.getLogger(__name__)
COMPACT_EVERY_SECONDS = 3600.0
RISK_TICK_SECONDS = 0.25  # a hold reaches ingest within this
STREAM_TICK_SECONDS = 0.5  # a live stream of payee events sees a new event within this


@dataclass
class Service:
    """Everything a running API process holds. Build it with `Service.build`, then `start()` / `stop()`."""

    settings: Settings
    deployment: Deployment
    w3: Web3
    rpc_session: requests.Session
    hub: Contract
    domain: Domain
    db: Database
    metrics: Metrics
    indexer: Indexer
    ingestor: Ingestor
    signin: SignIn
    keys: KeyDirectory
    devnet: bool
    settler: Settler | None = None
    lease: Lease | None = None
    webhooks: WebhookSender | None = None
    horizon: Horizon | None = None  # payee events: how far payment ids are safe to read (payee_events.Horizon)
    streams: EventStreams | None = None  # payee events' live streams: their number, the front they wait on
    lookups: HostLookUps = field(default_factory=HostLookUps)  # webhook hosts, off the request threads
    risk: RiskMonitor | None = None
    metrics_port: MetricsPort | None = None
    balances: HubBalances = field(init=False)  # balances at a block, read once (payee summaries)
    forgeries: ForgeryBudgets = field(init=False)  # forged vouchers in each client's batches (docs/security.md)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _next_compaction: float = 0.0

    def __post_init__(self) -> None:
        self.balances = HubBalances(self.hub)
        self.forgeries = ForgeryBudgets(self.settings.client_forged_per_second, self.settings.client_forged_burst)

    @classmethod
    def build(cls, settings: Settings) -> Service:
        """Check the deployment against the chain, migrate the store, and assemble the pipeline."""
        deployment = Deployment.load(settings.deployment_file)
        session = requests.Session()
        w3 = connect(
            settings.rpc_url, settings.rpc_timeout, session, settings.rpc_fallback_urls, settings.rpc_primary_retry
        )
        anchor = deployment.check(w3)
        hub = hub_contract(w3, deployment)
        domain = read_domain(hub)
        devnet = is_devnet(w3)
        db = Database(settings.database_url, pool_size=settings.db_pool_size)
        try:
            db.migrate()
            with db.write() as conn:
                bind_deployment(conn, deployment.chain_id, deployment.address, anchor)
                check_credentials(conn, settings, devnet)
                secret = (
                    settings.signin_secret.get_secret_value().encode()
                    if settings.signin_secret is not None
                    else signin_secret(conn)
                )
        except BaseException:
            db.dispose()  # a refused store must not leave its connections to the garbage collector
            session.close()
            raise
        metrics = Metrics()
        shard = Shard(settings.shard, settings.shards)
        indexer = Indexer(
            db,
            w3,
            hub,
            start_block=deployment.block_number,
            anchor=anchor,
            confirmations=settings.confirmations,
            batch_blocks=settings.indexer_batch_blocks,
            verify_blocks=settings.indexer_verify_blocks,
            reorg_window=settings.reorg_window,
            absent_ttl=settings.unknown_channel_ttl,
            lookups_per_second=settings.chain_lookups_per_second,
            shard=shard,
        )
        ingestor = Ingestor(
            db,
            VoucherVerifier(domain),
            indexer,
            metrics,
            close_guard=settings.close_guard_seconds,
            group_max=settings.ingest_group_max,
            recovery_threads=settings.recovery_threads,
            recovery_processes=settings.recovery_processes,
            payer_rates=PayerRates(settings.payer_vouchers_per_second, settings.payer_burst),
            unknown_reads_per_second=settings.unknown_channel_reads_per_second,
            held_max=settings.held_channels,
            shard=shard,
        )
        indexer.opened = ingestor.remember
        ingestor.warm(settings.warm_channels)
        signin = SignIn(secret, deployment.chain_id, settings.signin_challenge_seconds, settings.signin_token_seconds)
        keys = KeyDirectory(db, settings.unknown_key_reads_per_second)
        service = cls(
            settings, deployment, w3, session, hub, domain, db, metrics, indexer, ingestor, signin, keys, devnet
        )
        if settings.engine_enabled:
            account = operator_account(settings, w3)
            service.settler = Settler(db, w3, hub, account, settings, metrics)
            service.lease = Lease(db)
        service.horizon = Horizon(db)
        service.streams = EventStreams(
            db,
            service.horizon,
            STREAM_TICK_SECONDS,
            settings.event_streams_max,
            settings.event_streams_per_account,
            settings.event_streams_without_channels,
        )
        service.risk = RiskMonitor(db, settings, ingestor, metrics)
        service.risk.refresh()
        if settings.webhooks_enabled:
            service.webhooks = WebhookSender(db, settings, service.private_webhooks, service.horizon)
        return service

    @property
    def private_webhooks(self) -> bool:
        """Whether webhook URLs may name the service's own network (a devnet's receivers are local)."""
        return self.settings.webhook_allow_private_targets or self.devnet

    def start(self) -> None:
        if self._threads:  # started already (an app's lifespan can run twice): one set of threads, not two
            return
        self._stop.clear()
        self.ingestor.start()
        thread = threading.Thread(
            target=self.indexer.run, args=(self._stop, self.settings.indexer_interval), name="indexer", daemon=True
        )
        thread.start()
        self._threads.append(thread)
        if self.settler is not None:
            engine = threading.Thread(target=self._run_engine, name="settlement-engine", daemon=True)
            engine.start()
            self._threads.append(engine)
        if self.risk is not None:  # the operator's rules to ingest; behaviour checked every window
            self._every(RISK_TICK_SECONDS, "risk-monitor", self.risk.tick, self.risk.close)
        if self.webhooks is not None:  # payee events, while this process holds the webhooks' lease
            self._every(self.settings.webhook_tick, "payee-webhooks", self.webhooks.tick, self.webhooks.close)
        if self.settings.metrics_port is not None:
            self.metrics_port = MetricsPort(
                self.metrics.registry, self.refresh_metrics, self.settings.metrics_host, self.settings.metrics_port
            )
            self.metrics_port.start()

    def refresh_metrics(self) -> None:
        """Set the gauges that are read off the indexer and the RPC provider rather than counted as things happen."""
        progress = self.indexer.progress
        if progress is not None:
            self.metrics.indexer_head.set(progress.head)
            self.metrics.indexer_cursor.set(progress.cursor)
            self.metrics.indexer_lag.set(progress.lag)
        provider = self.w3.provider
        if isinstance(provider, FailoverProvider):
            for method, count in dict(provider.calls).items():
                self.metrics.rpc_requests.labels(method=method).set(count)
            self.metrics.rpc_active_url.set(provider.active)
            self.metrics.rpc_wrong_chain_urls.set(len(provider.wrong_chain))

    def _every(self, seconds: float, name: str, step: Callable[[], object], finish: Callable[[], None]) -> None:
        """Run `step` every `seconds` on a thread of its own until stop (a failing step is logged and retried at the
        next turn, the store or chain being down), then `finish`."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    step()
                except Exception as ex:
                    logger.warning("%s: %s; retrying", name, getattr(ex, "message", None) or ex)
                self._stop.wait(seconds)
            finish()

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run_engine(self) -> None:
        """Tick the settler while this process holds the lease; otherwise stand by and try to take it over."""
        assert self.settler is not None and self.lease is not None
        tick, failures = self.settings.engine_tick, 0
        while not self._stop.is_set():
            try:
                leader = self.lease.acquire()
                self.metrics.engine_leader.set(1 if leader else 0)
                if leader:
                    self.settler.tick()
                    self._compact_if_due()
                failures = 0
            except Exception as ex:
                failures = min(failures + 1, 20)
                wait = min(tick * 2**failures, max(tick, self.settings.engine_backoff_max))
                if isinstance(ex, SettlementError):
                    logger.warning("settlement engine: %s; retrying in %.1fs", ex.message, wait)
                else:
                    logger.exception("settlement engine step failed; retrying in %.1fs", wait)
                self._stop.wait(wait)
                continue
            self._stop.wait(tick)
        self.lease.release()

    def _compact_if_due(self) -> None:
        """The engine's leader removes settled payment rows past their retention, once an hour."""
        days = self.settings.payment_retention_days
        if days <= 0 or time.monotonic() < self._next_compaction:
            return
        self._next_compaction = time.monotonic() + COMPACT_EVERY_SECONDS
        removed = compact(self.db, days, time.time_ns() // 1000)
        if removed:
            logger.info("retention: removed %d settled payment rows older than %g days", removed, days)

    def stop(self) -> None:
        """Stop following the chain, finish every queued voucher, release the store."""
        self._stop.set()
        if self.metrics_port is not None:
            self.metrics_port.close()
            self.metrics_port = None
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        self.ingestor.stop()
        self.lookups.close()
        self.db.dispose()
        self.rpc_session.close()


def check_credentials(conn: Connection, settings: Settings, devnet: bool) -> None:
    """Off a devnet, refuse to serve reads to anyone: access control on, and an operator key to reach them."""
    if devnet:
        return
    if not settings.access_control:
        raise ConfigError("SETTLEMENT_ACCESS_CONTROL=false is for a devnet only; this chain is not one")
    if not has_live_key(conn, Role.OPERATOR):
        raise ConfigError(
            "no operator API key: make one with `settlement keys create --role operator` before serving this chain"
        )
