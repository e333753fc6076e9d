"""Prometheus metrics of one process, on their own registry (so several apps in one test process never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric the service exports; the names are part of the operator interface."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.vouchers_accepted = Counter(
            "settlement_vouchers_accepted", "Vouchers accepted as new payments", registry=self.registry
        )
        self.vouchers_duplicate = Counter(
            "settlement_vouchers_duplicate",
            "Re-sent vouchers answered with their stored receipt",
            registry=self.registry,
        )
        self.signers_recovered = Counter(
            "settlement_signers_recovered",
            "Signers of vouchers in requests of 16 or more recovered off the event loop, by where: a worker process,"
            " or threads (no worker ready yet, one died, or SETTLEMENT_RECOVERY_PROCESSES=0)",
            ["where"],
            registry=self.registry,
        )
        self.vouchers_deferred = Counter(
            "settlement_ingest_deferred_vouchers",
            "Vouchers committed in a second transaction because another process's writer held their channel's row"
            " (server processes sharing channels: route a channel to one process)",
            registry=self.registry,
        )
        self.group_writes = Counter(
            "settlement_ingest_group_writes",
            "Group transactions of the ingest writer, by how: held (PostgreSQL: judged against the writer's copies of"
            " its channels, each row locked only at that version by the write itself), ahead (held, and judged while"
            " the group before it was being written), locked (the rows locked and read first), moved (a held or"
            " ahead write rolled back, a channel having moved or being busy; then written locked)",
            ["how"],
            registry=self.registry,
        )
        self.vouchers_rejected = Counter(
            "settlement_vouchers_rejected",
            "Vouchers or requests refused, by error code",
            ["code"],
            registry=self.registry,
        )
        self.refusals_delayed = Counter(
            "settlement_refusals_delayed",
            "Refusals answered late: their connection was over SETTLEMENT_CONNECTION_REFUSALS_PER_SECOND",
            registry=self.registry,
        )
        self.group_size = Histogram(
            "settlement_ingest_group_size",
            "Vouchers per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "settlement_ingest_commit_seconds",
            "Time to judge and commit one group",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.x402_requests = Counter(
            "settlement_x402_requests",
            "x402 facilitator calls, by call (verify, settle) and answer (the reason, or ok)",
            ["call", "answer"],
            registry=self.registry,
        )
        self.rpc_requests = Gauge(
            "settlement_rpc_requests",
            "JSON-RPC requests this process sent, by method (since it started)",
            ["method"],
            registry=self.registry,
        )
        self.rpc_active_url = Gauge(
            "settlement_rpc_active_url",
            "The RPC URL requests go to now: its place in the list (0: SETTLEMENT_RPC_URL, 1: the first fallback, ...)",
            registry=self.registry,
        )
        self.rpc_wrong_chain_urls = Gauge(
            "settlement_rpc_wrong_chain_urls",
            "RPC URLs last seen serving another chain than the service's (passed over as down)",
            registry=self.registry,
        )
        self.risk_events = Counter(
            "settlement_risk_events", "Risk events recorded by this process, by kind", ["kind"], registry=self.registry
        )
        self.indexer_head = Gauge("settlement_indexer_head_block", "Latest chain block seen", registry=self.registry)
        self.indexer_cursor = Gauge(
            "settlement_indexer_cursor_block", "Last block whose events are applied", registry=self.registry
        )
        self.indexer_lag = Gauge(
            "settlement_indexer_lag_blocks", "Confirmed blocks not applied yet", registry=self.registry
        )
        self.batches = Counter(
            "settlement_batches", "Settlement batches by final status", ["status"], registry=self.registry
        )
        self.batch_entries = Histogram(
            "settlement_batch_entries",
            "Channels per settlement batch",
            buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800, 1200),
            registry=self.registry,
        )
        self.batch_gas = Histogram(
            "settlement_batch_gas",
            "Gas used per confirmed batch",
            buckets=(5e4, 1e5, 2.5e5, 5e5, 1e6, 2e6, 4e6, 8e6, 16e6),
            registry=self.registry,
        )
        self.settle_latency = Histogram(
            "settlement_voucher_to_settlement_seconds",
            "From a voucher's acceptance to the confirmation of its settlement",
            buckets=(1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
            registry=self.registry,
        )
        self.settler_balance = Gauge(
            "settlement_settler_balance_wei",
            "ETH the settler account holds (float, for alerting)",
            registry=self.registry,
        )
        self.closes_pending = Gauge(
            "settlement_closes_pending", "Closing channels with unsettled vouchers", registry=self.registry
        )
        self.close_seconds_left = Gauge(
            "settlement_close_seconds_left",
            "Seconds to the nearest close deadline with unsettled vouchers",
            registry=self.registry,
        )
        self.unsettled = Gauge(
            "settlement_unsettled_value",
            "Accepted but unsettled value per asset, base units (float)",
            ["token"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "settlement_entries_skipped", "Batch entries the hub skipped, by reason", ["reason"], registry=self.registry
        )
        self.alerts = Counter("settlement_alerts", "Alerts raised, by kind", ["kind"], registry=self.registry)
        self.engine_leader = Gauge(
            "settlement_engine_leader", "1 when this process runs the settlement engine", registry=self.registry
        )
