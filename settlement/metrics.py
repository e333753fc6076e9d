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
        self.vouchers_rejected = Counter(
            "settlement_vouchers_rejected",
            "Vouchers or requests refused, by error code",
            ["code"],
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
        self.indexer_head = Gauge("settlement_indexer_head_block", "Latest chain block seen", registry=self.registry)
        self.indexer_cursor = Gauge(
            "settlement_indexer_cursor_block", "Last block whose events are applied", registry=self.registry
        )
        self.indexer_lag = Gauge(
            "settlement_indexer_lag_blocks", "Confirmed blocks not applied yet", registry=self.registry
        )
