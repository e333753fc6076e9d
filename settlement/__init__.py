"""ChannelHub settlement service: EIP-712 micropayment vouchers, durable ingest, batch settlement on chain."""

__version__ = "0.1.0"
