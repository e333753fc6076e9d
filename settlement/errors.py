"""The one error tree of the service; every error carries an HTTP status and a stable machine-readable code.

    SettlementError                  500 internal_error
    ├── ConfigError                  500 config_invalid
    ├── ArtifactError                500 artifact_invalid
    │   └── SourceDriftError         500 artifact_source_drift
    ├── DevnetError                  500 devnet_failed
    ├── DeploymentError              500 deployment_missing
    └── ChainError                   502 chain_error
        ├── ChainUnavailableError    503 chain_unavailable
        └── TransactionFailedError   502 transaction_failed

Lower-level exceptions are wrapped at the boundary (`raise ArtifactError(...) from ex`) so callers catch one root.
Codes are part of the API: never rename one, add a new class instead.
"""

from __future__ import annotations


class SettlementError(Exception):
    """Root of every error this package raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(SettlementError, ValueError):
    """A setting is missing or unusable."""

    code = "config_invalid"


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


class ChainError(SettlementError):
    """The chain answered, but not as expected."""

    status = 502
    code = "chain_error"


class ChainUnavailableError(ChainError):
    """No configured RPC endpoint answers."""

    status = 503
    code = "chain_unavailable"


class TransactionFailedError(ChainError):
    """A transaction reverted or was never mined."""

    code = "transaction_failed"
