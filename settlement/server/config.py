"""Every knob of the service, in one place: environment variables prefixed SETTLEMENT_, or a .env file."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from settlement.chain.addresses import checksummed
from settlement.domain.model import ETH
from settlement.errors import ConfigError

# The mnemonic every anvil and hardhat devnet uses by default: public, so it is only ever a devnet default.
DEVNET_MNEMONIC = "test test test test test test test test test test test junk"

_PLACEHOLDER_KEYS = {"", "changeme", "change-me", "0x", "your-private-key", "0x" + "0" * 64}


class Settings(BaseSettings):
    """Service configuration; see the README's configuration table for what each field does."""

    model_config = SettingsConfigDict(env_prefix="SETTLEMENT_", env_file=".env", extra="ignore")

    # Chain access
    rpc_url: str = "http://127.0.0.1:8545"
    private_key: SecretStr | None = Field(default=None, description="operator key: deploys and settles")
    rpc_fallback_urls: list[str] = Field(
        default_factory=list, description="JSON list of RPC URLs of the same chain, tried in order when rpc_url fails"
    )
    rpc_primary_retry: float = Field(default=10.0, gt=0, description="seconds between probes of a failed rpc_url")
    rpc_timeout: float = Field(default=10.0, gt=0)
    tx_timeout: float = Field(default=120.0, gt=0)

    # Deployment
    deployment_file: Path = Path(".settlement/deployment.json")
    hub_address: str | None = Field(
        default=None, description="the hub a payee withdraws from when it has no deployment file"
    )
    challenge_period: int = Field(default=3600, ge=60, description="seconds between requestClose and finalize")

    # Storage
    database_url: str = Field(
        default="sqlite:///.settlement/settlement.db",
        description="sqlite:///path (default) or postgresql://user@host:port/db",
    )
    db_pool_size: int = Field(default=8, ge=1, le=200)

    # Chain indexer
    confirmations: int = Field(default=2, ge=0, le=1000, description="blocks before a deposit or event counts")
    indexer_interval: float = Field(default=1.0, gt=0, description="seconds between polls when caught up")
    indexer_batch_blocks: int = Field(default=2000, ge=1, description="blocks per eth_getLogs call, at most")
    indexer_verify_blocks: int = Field(
        default=64,
        ge=0,
        description="blocks this near the head checked against their headers' blooms: logs a node behind left out",
    )
    reorg_window: int = Field(default=256, ge=8, description="recent block hashes kept to find a fork point")
    unknown_channel_ttl: float = Field(
        default=2.0, ge=0, description="seconds a channel id the chain does not know is answered without asking it"
    )
    chain_lookups_per_second: float = Field(
        default=100.0, gt=0, description="look-ups of unknown channel ids on chain, per second at most (burst 2x)"
    )
    warm_channels: int = Field(
        default=100_000,
        ge=0,
        description="payers of stored channels that are not closed held in memory from the start (~150 bytes each): "
        "their vouchers need no store read, whatever SETTLEMENT_UNKNOWN_CHANNEL_READS_PER_SECOND allows",
    )
    held_channels: int = Field(
        default=100_000,
        ge=1,
        description="channels the ingest writer keeps as it last wrote them (~0.9 KB each): a group judges them "
        "without reading their rows, only their versions (docs/scaling.md); beyond, the least recently written go",
    )
    shard: int = Field(
        default=0,
        ge=0,
        description="this deployment's shard, 0 to SETTLEMENT_SHARDS - 1: it takes the vouchers of the payers that "
        "hash to it and refuses others with 421 wrong_shard (docs/scaling.md)",
    )
    shards: int = Field(
        default=1, ge=1, le=1024, description="shards of a deployment split by payer, each with its own store"
    )
    unknown_channel_reads_per_second: float = Field(
        default=1.0,
        gt=0,
        description="store reads of channel ids this process does not hold in memory, per second at most (burst 2x); "
        "beyond: 503 unknown_channels_busy, decided on the event loop, so a flood of made-up ids cannot crowd out "
        "payers whose channels are known. Honest new channels rarely need one: the process's indexer holds each "
        "channel it confirms (docs/benchmarks.md: at 50 a second a flood took two cores from the honest payers, "
        "at 5 it lifted their p99 past 2x in 3 runs of 6, at 1 in 1 of 7)",
    )
    unknown_key_reads_per_second: float = Field(
        default=5.0,
        gt=0,
        description="store reads of the live API keys' hashes when a key this process does not hold is presented, per "
        "second at most (burst 2x); beyond: 503 unknown_keys_busy, so a flood of made-up keys costs the store a "
        "bounded amount (a key it holds is read each time: a revoked key stops at once)",
    )

    # Ingest
    close_guard_seconds: int = Field(
        default=120, ge=0, description="stop accepting vouchers this long before a close deadline"
    )
    ingest_group_max: int = Field(default=1024, ge=1, description="vouchers per group commit at most")
    batch_max_items: int = Field(default=1000, ge=1, le=10_000, description="vouchers per batch request at most")
    recovery_threads: int = Field(
        default=2, ge=1, le=64, description="threads recovering a batch request's signers when no worker process can"
    )
    recovery_processes: int = Field(
        default=1,
        ge=0,
        le=64,
        description="worker processes recovering the signers of requests with 16 or more vouchers (0: threads only)",
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="request bodies above this get a 413")
    body_timeout_seconds: float = Field(default=10.0, gt=0, description="a body slower than this to arrive: 408")
    max_header_bytes: int = Field(default=16_384, ge=1024, description="a request's head larger than this: refused")
    head_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="a request's head slower than this to arrive: 408 (none of it: closed); so is a connection whose "
        "body is still coming this long after its answer",
    )
    write_timeout_seconds: float = Field(
        default=30.0, gt=0, description="an answer its client reads none of for this long: the connection dropped"
    )
    max_connections: int = Field(
        default=1000, ge=1, description="concurrent connections and requests; beyond them new ones get a 503"
    )
    keep_alive_seconds: int = Field(default=5, ge=1, description="an idle keep-alive connection is closed after")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "[::1]"],
        description='Host header names the API answers to (any port); JSON list; ["*"] for any (sign-in challenges '
        "name only a host listed by name)",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="JSON list of proxy addresses whose X-Forwarded-For names the client (rate limits, logs); empty: "
        "the header is ignored and the client is the connection's peer",
    )
    client_requests_per_second: float = Field(
        default=5000.0, ge=0, description="requests a second one client may send (0: no limit); beyond: 429"
    )
    request_threads: int = Field(
        default=4,
        ge=1,
        le=64,
        description="threads for the blocking work of requests (store reads, look-ups of unknown channels); few, so "
        "that a flood of such requests cannot starve the event loop and the ingest writer of the GIL",
    )
    client_burst: float = Field(default=10_000.0, ge=1, description="requests one client may send at once, saved up")
    client_ipv6_prefix: int = Field(
        default=64,
        ge=16,
        le=128,
        description="an IPv6 client's limits count against its network of this many bits (a host holds a /64 and may "
        "send from any address in it); an IPv4 client's against its address",
    )
    connection_refusals_per_second: float = Field(
        default=5.0,
        ge=0,
        description="refused requests (4xx, 503) one connection gets answered per second, beyond its burst (0: no "
        "limit): further refusals wait their turn, so a connection that keeps sending what is refused (forged "
        "vouchers, made-up ids) is slowed to that pace, whatever client addresses it names",
    )
    connection_refusal_burst: float = Field(
        default=20.0, ge=1, description="refused requests one connection gets answered at once before the pace applies"
    )
    payer_vouchers_per_second: float = Field(
        default=0.0,
        ge=0,
        description="vouchers a second one payer's key may sign, all its channels and clients together, per serve "
        "process (0: no limit); beyond: 429 payer_rate_limited",
    )
    payer_burst: float = Field(default=10_000.0, ge=1, description="vouchers one payer may send at once, saved up")
    client_forged_per_second: float = Field(
        default=100.0,
        ge=0,
        description="vouchers with a signature that is not their channel's payer's one client may send a second in "
        "batches (/v1/vouchers/batch, /x402/settle/batch; 0: no limit): each costs a signature recovery and a batch "
        "is answered 200 whatever its items' refusals; a client past it gets 429 rate_limited for its batches",
    )
    client_forged_burst: float = Field(
        default=1_000.0, ge=1, description="forged vouchers in batches one client may send at once, saved up"
    )
    access_control: bool = Field(
        default=True,
        description="reads need credentials (docs/security.md); false only on a devnet: any caller reads anything",
    )
    signin_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key of sign-in challenges and tokens (None: one made and kept in the store, shared by "
        "every process on it); changing it ends every token",
    )
    signin_token_seconds: int = Field(default=3600, ge=60, le=86_400, description="a sign-in token lasts this long")
    signin_challenge_seconds: int = Field(default=300, ge=30, le=3600, description="a challenge must be signed within")
    api_key: SecretStr | None = Field(
        default=None, description="the API key `settlement payee` and other client commands send"
    )
    webhooks_enabled: bool = Field(default=True, description="`serve` delivers payee webhooks (one process: a lease)")
    webhook_tick: float = Field(default=0.5, gt=0, description="seconds between looks for events to deliver")
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, description="a receiver slower than this: a failure")
    webhook_backoff_max_seconds: float = Field(
        default=600.0, gt=0, description="a failing receiver is retried after 1, 2, 4 ... seconds, at most this"
    )
    webhook_batch: int = Field(default=100, ge=1, le=10_000, description="events one webhook is sent per tick")
    webhook_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        description="webhooks delivered to at once (and a quarter as many more, at least one, for receivers slow to "
        "answer)",
    )
    webhooks_per_payee: int = Field(default=10, ge=1, le=1000, description="live webhooks a payee may have")
    webhooks_max: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="live webhooks in all, every payee's: the sender reads each one's row at every tick, and anyone "
        "may sign in with a fresh key and make webhooks for its own address (503 webhooks_full beyond)",
    )
    webhooks_without_channels: int = Field(
        default=1_000,
        ge=0,
        le=10_000_000,
        description="of those, live webhooks in all of payees that are the payee of no channel here: fresh keys, free "
        "to make, never hold back a payee with channels (503 webhooks_full beyond)",
    )
    event_streams_max: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="live streams of payee events (GET /v1/payees/{address}/events) this process serves at once; "
        "beyond: 503 streams_full",
    )
    event_streams_per_account: int = Field(
        default=4, ge=1, le=10_000, description="live streams one account may hold on this process; beyond: 429"
    )
    event_streams_without_channels: int = Field(
        default=10,
        ge=0,
        le=10_000,
        description="of those, live streams this process serves in all to payees of no channel here (503 "
        "streams_full beyond)",
    )
    caps_per_payee: int = Field(
        default=100, ge=1, le=10_000, description='spending caps a payee (or the operator\'s "every payee") may have'
    )
    caps_max: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="spending caps in all: every process reads and holds every one (503 caps_full beyond)",
    )
    caps_without_channels: int = Field(
        default=1_000,
        ge=0,
        le=1_000_000,
        description="of those, caps in all of payees that are the payee of no channel here (503 caps_full beyond)",
    )
    webhook_allow_private_targets: bool = Field(
        default=False,
        description="allow webhook URLs on loopback, private or link-local addresses (always allowed on a devnet)",
    )
    ready_max_lag: int = Field(default=64, ge=0, description="/ready fails when the indexer is further behind")
    ready_chain_max_age: float = Field(
        default=1.0,
        ge=0,
        description="seconds /ready reuses the chain's head as last read (by the indexer, another check) while no read "
        "failed: anyone may ask /ready, and each answer cost a call to the chain's RPC (0: read every time)",
    )

    # Settlement engine
    engine_enabled: bool = Field(default=True, description="`serve` also runs the settlement engine (one leader)")
    settle_interval: float = Field(default=30.0, gt=0, description="seconds between regular batches")
    min_settle_amount: int = Field(default=1, ge=1, description="base units unsettled before a channel is batched")
    settle_fee_share_percent: int = Field(
        default=10,
        ge=0,
        le=100,
        description="an ETH channel joins a regular batch only when its gas costs at most this share of the value it "
        "settles, at the current fee (0: no such check)",
    )
    settle_gas_per_channel: int = Field(
        default=12_000, ge=1, description="gas one more channel adds to a batch, for that check (docs/gas.md)"
    )
    token_min_settle_amounts: dict[str, int] = Field(
        default_factory=dict,
        description="JSON object: ERC-20 address -> base units unsettled before a channel of it joins a regular "
        "batch (tokens not named: min_settle_amount)",
    )
    summary_balances_max: int = Field(
        default=32,
        ge=1,
        description="hub balances a payee's summary reads from the chain at most (ETH and the tokens of "
        "token_min_settle_amounts first); the others' withdrawable is null and listed in balancesUnread: a payer "
        "picks its channel's token, and each asset was an RPC call a summary, on a request thread",
    )
    unsettled_tokens_shown: int = Field(
        default=100,
        ge=0,
        description="assets the settlement_unsettled_value gauge names besides ETH and the tokens of "
        "token_min_settle_amounts (which it always names): a payer picks its channel's token, and each named asset "
        "is a series every scrape carries",
    )
    max_spend_per_hour_wei: int = Field(
        default=10**18,
        ge=0,
        description="settler gas spend over the last hour above which regular batches wait (closes still settle)",
    )
    max_unpriced_spend_per_hour_wei: int = Field(
        default=10**16,
        ge=0,
        description="settler gas spend over the last hour on channels in tokens token_min_settle_amounts does not "
        "name, above which regular batches leave such channels out (their closes still settle): a payer picks its "
        "channel's token, and without it a token of its own could spend the whole hourly ceiling",
    )
    front_run_alert_skips: int = Field(
        default=3, ge=1, description="ALERT front_run when a batch has this many entries the chain had settled"
    )
    batch_max_entries: int = Field(default=400, ge=1, le=1200, description="channels per settleBatch at most")
    batch_gas_limit: int = Field(default=8_000_000, ge=100_000, le=16_777_216, description="gas per batch at most")
    max_fee_per_gas: int = Field(default=500 * 10**9, ge=1, description="fee ceiling, wei per gas")
    priority_fee_per_gas: int | None = Field(
        default=None, ge=0, description="settlements' tip, wei per gas (None: the node's suggestion at each sending)"
    )
    bump_after: float = Field(default=30.0, gt=0, description="seconds before an unmined batch is re-sent dearer")
    bump_percent: int = Field(default=20, ge=11, le=500, description="fee increase per replacement")
    close_alert_seconds: int = Field(default=900, ge=0, description="alert when a close deadline is this near")
    low_balance_wei: int = Field(default=10**16, ge=0, description="alert when the settler holds less ETH")
    engine_tick: float = Field(default=1.0, gt=0, description="seconds between engine checks")
    engine_backoff_max: float = Field(
        default=30.0, gt=0, description="after failed engine steps the wait doubles from engine_tick up to this"
    )

    # Risk controls
    min_increments: dict[str, int] = Field(
        default_factory=dict,
        description="JSON object: asset address (0x0…0 for ETH) -> the least a voucher must add (dust payments that "
        "only fill the store get 409 increment_too_small)",
    )
    risk_window_seconds: float = Field(default=60.0, gt=0, description="the window behaviour is counted over")
    risk_payer_vouchers_per_window: int = Field(
        default=600_000, ge=1, description="a payer's accepted vouchers in a window above which: risk event burst"
    )
    risk_burst_factor: float = Field(
        default=10.0, gt=1, description="burst also when a payer's vouchers are this many times its previous window"
    )
    risk_refusals_per_window: int = Field(
        default=100, ge=1, description="refusals of one payer for one reason in a window: repeated_refusals / dust"
    )
    risk_new_channels_per_window: int = Field(
        default=20, ge=1, description="channels one payer opens in a window: channel_spread"
    )

    # Retention
    payment_retention_days: float = Field(
        default=30.0,
        ge=0,
        description="payment rows whose value is settled on chain are removed this long after acceptance (the "
        "channel's latest stays; 0: kept for ever); the engine's leader compacts hourly, `settlement compact` now",
    )

    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="also serve the Prometheus metrics here, without an API key (0 picks a free port; None: only the "
        "API's operator route /metrics)",
    )
    metrics_host: str = Field(default="127.0.0.1", description="the metrics port's bind address: the scraper's network")

    # A payee's own commands (`settlement withdraw`, `settlement payee`)
    withdraw_key: SecretStr | None = Field(default=None, description="the key `settlement withdraw` signs with")
    service_url: str | None = Field(
        default=None, description="the service `settlement payee` asks (None: http://api_host:api_port)"
    )

    # Local devnet (anvil)
    anvil_path: Path | None = None
    devnet_host: str = "127.0.0.1"
    devnet_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    devnet_chain_id: int = Field(default=31337, gt=0)
    devnet_block_time: float | None = Field(default=None, gt=0, description="None mines on every transaction")
    devnet_accounts: int = Field(default=10, ge=1, le=1000)
    devnet_balance_eth: int = Field(default=10_000, ge=0)
    devnet_mnemonic: str = DEVNET_MNEMONIC
    devnet_start_timeout: float = Field(default=30.0, gt=0)
    devnet_keep_states: int | None = Field(
        default=None, ge=1, description="keep only this many recent states in memory (None: the whole history)"
    )

    @field_validator("token_min_settle_amounts")
    @classmethod
    def _checksum_tokens(cls, value: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for token, amount in value.items():
            typed = checksummed(token, "token_min_settle_amounts:")
            if amount < 1:
                raise ValueError(f"token_min_settle_amounts: {token} needs at least 1 base unit")
            out[typed] = amount
        return out

    @field_validator("private_key", "withdraw_key")
    @classmethod
    def _refuse_placeholder_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        name = f"SETTLEMENT_{str(info.field_name).upper()}"
        raw = value.get_secret_value().strip().lower()
        if raw in _PLACEHOLDER_KEYS:
            raise ValueError(f"{name} is a placeholder; set a real key or leave it unset")
        if not is_private_key(raw):
            raise ValueError(f"{name} must be 32 bytes of hex (0x + 64 hex digits)")
        return value

    @model_validator(mode="after")
    def _shard_in_range(self) -> Settings:
        if self.shard >= self.shards:
            raise ValueError(
                f"SETTLEMENT_SHARD={self.shard} is not one of SETTLEMENT_SHARDS={self.shards} (0 to {self.shards - 1})"
            )
        return self

    @property
    def priced_assets(self) -> frozenset[str]:
        """ETH and the tokens of token_min_settle_amounts: the assets the operator prices. A payer picks its channel's
        token and may make its own, in any amount: what the service spends on an asset, or how it ranks one, puts
        these first and bounds the rest."""
        return frozenset({ETH, *self.token_min_settle_amounts})

    @field_validator("hub_address")
    @classmethod
    def _checksum_hub(cls, value: str | None) -> str | None:
        return None if value is None else checksummed(value, "SETTLEMENT_HUB_ADDRESS:")


def is_private_key(text: str) -> bool:
    """32 bytes of hex, with or without 0x: the shape of a secp256k1 key (the curve check is eth-account's)."""
    digits = text.strip().lower().removeprefix("0x")
    return len(digits) == 64 and all(c in "0123456789abcdef" for c in digits)


NOT_SETTINGS = frozenset({"SETTLEMENT_TEST_POSTGRES_URL"})  # the tests' and the benchmarks' PostgreSQL, not ours
_ENV_FILE_NAME = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")  # a .env line's name, as dotenv reads it


def setting_variables() -> list[str]:
    """Every setting's variable name (SETTLEMENT_RPC_URL, ...)."""
    return [f"SETTLEMENT_{field.upper()}" for field in Settings.model_fields]


def unknown_variables(environ: Mapping[str, str], env_file: Path | None) -> list[str]:
    """The SETTLEMENT_* names, in the environment or the .env file, that no setting reads: one misspelt
    (SETTLEMENT_RPC_FALLBACKS for SETTLEMENT_RPC_FALLBACK_URLS) was ignored without a word, and its default used."""
    names = set(environ)
    if env_file is not None and env_file.is_file():
        lines = env_file.read_text(encoding="utf-8", errors="replace").splitlines()
        names |= {found.group(1) for line in lines if (found := _ENV_FILE_NAME.match(line))}
    known = {*setting_variables(), *NOT_SETTINGS}
    return sorted(name for name in names if name.upper().startswith("SETTLEMENT_") and name.upper() not in known)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; a SETTLEMENT_* variable no setting reads is refused (ConfigError)."""
    unknown = unknown_variables(os.environ, Path(".env"))
    if unknown:
        known = setting_variables()
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
            named.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ConfigError(
            f"not a setting: {', '.join(named)}, in the environment or .env: fix or unset it (the README lists every "
            "setting)"
        )
    return Settings()
