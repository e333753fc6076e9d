"""The payee's side of `channelhub` for the official `x402` package (`SchemeNetworkServer`): register it on an
`x402ResourceServer` next to an `HTTPFacilitatorClient` that points at our service's `/x402`, and guard routes with
x402's own middleware.

Prices are base units of the configured asset (an int, or a decimal string of base units), or a human amount of
it (`"0.001"` with the asset's decimals); dollar prices are refused (no price oracle here). The requirements carry
what a payer needs to pay and nothing more: the hub and its EIP-712 domain from the facilitator, a deposit hint, and
(when given) the facilitator's URL, so that a payer without a service of its own knows whose position to trust.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from x402.interfaces import PaymentFlowConfig
from x402.payment_flow import AUTHORIZATION_PAYMENT_FLOW, SDK_DEFAULT_ASSET_TRANSFER_METHOD
from x402.schemas import AssetAmount, PaymentRequirements, Price, SupportedKind

from settlement.domain.amounts import units_of_human
from settlement.domain.model import ETH
from settlement.x402 import wire
from settlement.x402.wire import SCHEME, chain_id_of


class ChannelHubServerScheme:
    """`channelhub` pricing for a payee: one asset (ETH by default), a deposit hint of `deposit_multiple` prices."""

    scheme = SCHEME
    default_asset_transfer_method = SDK_DEFAULT_ASSET_TRANSFER_METHOD
    # Verify before the handler, settle after it: a payer pays only for a response it gets (an error or a non-2xx
    # answer is never settled), and the response goes out only once the payment is durably accepted.
    payment_flows: Mapping[str, PaymentFlowConfig] = {SDK_DEFAULT_ASSET_TRANSFER_METHOD: AUTHORIZATION_PAYMENT_FLOW}

    def __init__(
        self, asset: str = ETH, *, decimals: int = 18, deposit_multiple: int = 1000, facilitator_url: str | None = None
    ) -> None:
        if deposit_multiple < 1:
            raise ValueError("deposit_multiple must be at least 1")
        self.facilitator_url = facilitator_url
        self.asset = asset
        self.decimals = decimals
        self.deposit_multiple = deposit_multiple

    def parse_price(self, price: Price, network: str) -> AssetAmount:
        if chain_id_of(network) is None:
            raise ValueError(f"{SCHEME} runs on eip155 networks, not {network}")
        if isinstance(price, AssetAmount):
            return price
        return AssetAmount(amount=str(self.base_units(price)), asset=self.asset)

    def base_units(self, price: str | int | float) -> int:
        """An int is base units; a string of digits too; a decimal string is a human amount of the asset, converted
        exactly (`settlement.domain.amounts`)."""
        if isinstance(price, bool) or isinstance(price, float):
            raise ValueError("give a price as an int of base units or a decimal string, never a float")
        text = str(price).strip()
        if text.startswith("$"):
            raise ValueError(f"{SCHEME} prices are in the asset, not dollars: {text!r}")
        units = units_of_human(text, self.decimals) if "." in text else wire.base_units(text)
        if units is None:
            raise ValueError(f"{text[:100]!r} is not a whole positive number of base units of {self.asset}")
        return units

    def enhance_payment_requirements(
        self, requirements: PaymentRequirements, supported_kind: SupportedKind, extensions: list[str]
    ) -> PaymentRequirements:
        """Add the hub and its domain (from the facilitator's /supported), the deposit hint, the facilitator."""
        extra: dict[str, Any] = dict(requirements.extra or {})
        extra.update(supported_kind.extra or {})
        extra["minDeposit"] = str(int(requirements.amount) * self.deposit_multiple)
        if self.facilitator_url is not None:
            extra["facilitator"] = self.facilitator_url
        return requirements.model_copy(update={"extra": extra})
