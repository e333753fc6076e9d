"""What apps import to pay: the payer client and its durable journal. Depends on nothing of the server."""

from settlement.errors import PaymentUncertainError, ServiceRejectedError, SettlementError, UntrustedServiceError
from settlement.sdk.journal import PayerJournal
from settlement.sdk.payer import ChannelRef, PayerClient

__all__ = [
    "ChannelRef",
    "PayerClient",
    "PayerJournal",
    "PaymentUncertainError",
    "ServiceRejectedError",
    "SettlementError",
    "UntrustedServiceError",
]
