"""The operator's key: the account that deploys the hub and signs settlements."""

from __future__ import annotations

import logging

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from settlement.errors import ConfigError
from settlement.server.config import Settings

logger = logging.getLogger(__name__)


def devnet_accounts(mnemonic: str, count: int) -> list[LocalAccount]:
    """The accounts anvil funds for `mnemonic`, with their keys (standard m/44'/60'/0'/0/i path)."""
    Account.enable_unaudited_hdwallet_features()
    return [Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{i}") for i in range(count)]


def operator_account(settings: Settings, w3: Web3) -> LocalAccount:
    """The configured key; on a local anvil only, fall back to its first funded account."""
    if settings.private_key is not None:
        account: LocalAccount = Account.from_key(settings.private_key.get_secret_value())
        return account
    if w3.client_version.lower().startswith("anvil") and w3.eth.chain_id == settings.devnet_chain_id:
        logger.warning("SETTLEMENT_PRIVATE_KEY unset: using the devnet's first account (anvil only)")
        return devnet_accounts(settings.devnet_mnemonic, 1)[0]
    raise ConfigError("SETTLEMENT_PRIVATE_KEY is required on any chain but a local anvil devnet")
