"""What apps import to pay: the payer client and its durable journal. Depends on nothing of the server.

Its names are imported when first asked for (PEP 562): a part of the SDK imported alone (`settlement.sdk.answers`,
which `settlement payee` uses) does not bring web3 and eth-account with it, seconds of start-up on a slow machine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from settlement.errors import (
        BudgetExceededError,
        PaymentUncertainError,
        ServiceRejectedError,
        SettlementError,
        UntrustedServiceError,
    )
    from settlement.sdk.journal import Budget, PayerJournal
    from settlement.sdk.payee import PayeeClient
    from settlement.sdk.payer import ChannelRef, PayerClient
    from settlement.sdk.shards import service_for

_FROM = {
    "Budget": "settlement.sdk.journal",
    "BudgetExceededError": "settlement.errors",
    "ChannelRef": "settlement.sdk.payer",
    "PayeeClient": "settlement.sdk.payee",
    "PayerClient": "settlement.sdk.payer",
    "PayerJournal": "settlement.sdk.journal",
    "PaymentUncertainError": "settlement.errors",
    "ServiceRejectedError": "settlement.errors",
    "SettlementError": "settlement.errors",
    "UntrustedServiceError": "settlement.errors",
    "service_for": "settlement.sdk.shards",
}

__all__ = [  # what _FROM names, spelled out for the type checker and the linter
    "Budget",
    "BudgetExceededError",
    "ChannelRef",
    "PayeeClient",
    "PayerClient",
    "PayerJournal",
    "PaymentUncertainError",
    "ServiceRejectedError",
    "SettlementError",
    "UntrustedServiceError",
    "service_for",
]


def __getattr__(name: str) -> Any:
    module = _FROM.get(name)
    if module is None:
        raise AttributeError(f"module 'settlement.sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
