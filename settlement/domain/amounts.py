"""Human amounts of an asset (`"0.001"` ETH) and its base units, converted exactly.

Money is an int of base units. Python's `Decimal` rounds its arithmetic to 28 significant digits: `scaleb` made the
price "12345678901.123456789012345678" ETH 12345678901123456789012345680 wei, let "1.0000000000000000000000000000001"
ETH pass as 10^18, and printed a balance of 30 digits rounded. Here the digits are moved by string and int arithmetic
alone.
"""

from __future__ import annotations

import re

from settlement.domain.model import MAX_UINT256

_HUMAN = re.compile(r"([0-9]*)\.([0-9]*)")  # ASCII digits only: `int` also takes "١٢٣", "+5" and "1_000"
_DIGITS_MAX = 80  # MAX_UINT256 has 78 digits; longer text is refused before `int` reads it


def units_of_human(text: str, decimals: int) -> int | None:
    """The base units of a human amount written with a point (`"1.5"`, `".5"`, `"2."`), `decimals` digits to a whole
    unit; None when it is not one, or is not a whole number of base units above 0 and up to 2^256 - 1."""
    found = _HUMAN.fullmatch(text)
    if found is None or len(text) > _DIGITS_MAX + decimals or text == ".":
        return None
    whole, fraction = found.group(1), found.group(2).rstrip("0")
    if len(fraction) > decimals:
        return None  # finer than a base unit
    units = int(whole or "0") * 10**decimals + int(fraction.ljust(decimals, "0") or "0")
    return units if 0 < units <= MAX_UINT256 else None


def human_of_units(value: int, decimals: int) -> str:
    """`value` base units as a human amount, every digit kept: 1500 with 18 decimals is `0.0000000000000015`."""
    whole, fraction = divmod(value, 10**decimals)
    digits = str(fraction).rjust(decimals, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)
