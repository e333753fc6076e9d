"""Voucher ingest: payer lookup, signer recovery, group commits on one writer thread."""
