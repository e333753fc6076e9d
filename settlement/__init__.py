"""ChannelHub settlement: EIP-712 micropayment vouchers, durable ingest, batch settlement on chain.

`settlement.sdk` is what apps import (installed by `pip install channelhub-settlement`); the service that operators
run needs the `[server]` extra. README.md's architecture table maps every package.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("channelhub-settlement")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
