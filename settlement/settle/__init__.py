"""The settlement engine (batches, fees, watchtower), its lease, and store-versus-chain reconciliation."""
