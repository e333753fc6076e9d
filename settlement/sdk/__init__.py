"""What apps import to pay: the payer client and its durable journal. Depends on nothing of the server."""

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

__all__ = [
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
