"""Talking to the chain: the RPC provider with failover, signed transactions, revert decoding, the shipped
contract artifacts, the hub's deployment record and the settleBatch codec. Shared by the SDK and the server."""
