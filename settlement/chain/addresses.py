"""Addresses as people and apps type or paste them: 0x and 40 hex digits, in one case, or in mixed case with a correct
EIP-55 checksum. eth_utils' `is_address` takes any mixed case, so an address pasted with one character wrong was
taken for another account (`settlement withdraw --to` sent the balance there); EIP-55's checksum exists to catch it.
"""

from __future__ import annotations

from eth_utils.address import is_address, is_checksum_address, to_checksum_address

ADDRESS_RULE = "0x + 40 hex digits; mixed case must be a correct EIP-55 checksum"


def is_typed_address(value: str) -> bool:
    """Whether `value` is an address by `ADDRESS_RULE`."""
    if not is_address(value) or not value.startswith("0x"):
        return False
    digits = value[2:]
    return digits in (digits.lower(), digits.upper()) or is_checksum_address(value)


def checksummed(value: str, name: str, error: type[ValueError] = ValueError) -> str:
    """`value` in EIP-55 form, if it is an address by `ADDRESS_RULE`; else `error` (a ValueError: the CLI's
    ConfigError) naming `name`."""
    if not is_typed_address(value):
        raise error(f"{name} {value!r} is not an address ({ADDRESS_RULE})")
    return to_checksum_address(value)
