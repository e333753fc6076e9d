"""What a payee app imports: its position at the service and on chain, the cooperative refund, and withdrawals.

The cooperative refund: a payer done with a channel (or a payee done with a payer) need not wait out the challenge
period. The payee closes the channel at once with `closeByPayee` and the payer's latest voucher: the payee is
credited everything the payer signed, the rest of the deposit goes back to the payer's hub balance in the same
transaction. Only the payee can do it, so it is the payee's choice; the payer loses nothing by it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import httpx
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from settlement.chain.addresses import checksummed
from settlement.chain.node import Transactor, connect, rpc_errors
from settlement.domain.model import ETH, ChannelViewField, signature_of
from settlement.eip712.vouchers import VoucherVerifier
from settlement.errors import UntrustedServiceError
from settlement.sdk.answers import answer_object, refusal, service_amount, unanswered
from settlement.sdk.bounded import bounded_client
from settlement.sdk.payer import checked_hub
from settlement.sdk.signin import SignInAuth


class PayeeClient:
    """One payee's key, the hub (checked on chain, as the payer's client checks it) and the service."""

    def __init__(
        self,
        private_key: str,
        rpc_url: str,
        service_url: str,
        *,
        hub_address: str | None = None,
        timeout: float = 10,
        http: httpx.Client | None = None,
        max_fee_per_gas: int | None = None,
        rpc_fallback_urls: Sequence[str] = (),
    ) -> None:
        """`http`: the client to reach the service with (a proxy, other timeouts), else one made here.
        `max_fee_per_gas` (wei): the most its transactions (refunds' closes, withdrawals) offer a gas, re-priced with
        the chain's base fee while unmined (settlement.chain.node.Transactor); None follows the base fee alone.
        `rpc_fallback_urls`: more RPC URLs of the same chain, tried in order when `rpc_url` fails (each held to its
        chain: settlement.chain.provider)."""
        self.account: LocalAccount = Account.from_key(private_key)
        self._rpc_session = requests.Session()
        self.w3 = connect(rpc_url, timeout, self._rpc_session, fallbacks=rpc_fallback_urls)
        self.http = http or bounded_client(service_url, timeout)
        try:
            self.hub, self.domain = checked_hub(self.w3, self._get("/v1/eip712"), hub_address)
            self.transactor = Transactor(
                self.w3,
                self.account,
                list(self.hub.abi),  # type: ignore[arg-type]
                max_fee_per_gas=max_fee_per_gas,
            )
        except BaseException:
            self.shutdown()
            raise
        if self.http.auth is None:  # reads of its own channels: signed in with its own key when asked to
            self.http.auth = SignInAuth(self.account, service_url, self.domain.chain_id)
        self._verifier = VoucherVerifier(self.domain)

    @property
    def address(self) -> str:
        return str(self.account.address)

    @rpc_errors("refunding a channel")
    def refund(self, channel_id: str) -> int:
        """Close the channel now with the payer's latest voucher the service holds (checked against the payer's
        key first): returns what went back to the payer. The channel is stopped at the service first (it accepts
        no voucher after the one the stop answers), so every payment the service acknowledged is settled by the
        close. Raises UntrustedServiceError when the service's voucher is not the payer's."""
        raw = bytes.fromhex(channel_id.removeprefix("0x"))
        view = self.hub.functions.channel(raw).call()
        if to_checksum_address(view[ChannelViewField.PAYEE]) != self.address:
            raise ValueError(f"channel {channel_id} does not pay {self.address}")
        state = self.stop(channel_id)
        cumulative = service_amount(state, "acceptedCumulativeAmount")
        signature = b""
        if cumulative > int(view[ChannelViewField.SETTLED]):
            sent = signature_of(state.get("latestSignature"))
            payer = bytes.fromhex(str(view[ChannelViewField.PAYER])[2:])
            if sent is None or self._verifier.recover(raw, cumulative, sent) != payer:
                raise UntrustedServiceError(f"the service's latest voucher on {channel_id} is not the payer's")
            signature = sent
        deposit = int(view[ChannelViewField.DEPOSIT])
        self.transactor.send(self.hub.functions.closeByPayee(raw, cumulative, signature))
        return deposit - max(cumulative, int(view[ChannelViewField.SETTLED]))

    def stop(self, channel_id: str) -> dict[str, Any]:
        """Stop the channel at the service before closing it on chain (`refund` does both): the service accepts no
        voucher on it after this, and answers its state (`acceptedCumulativeAmount`, `latestSignature`: the last
        voucher accepted). Final."""
        return self._post(f"/v1/channels/0x{bytes.fromhex(channel_id.removeprefix('0x')).hex()}/stop")

    @rpc_errors("withdrawing the payee's hub balance")
    def withdraw(self, token: str | None = None) -> int:
        """Everything the hub holds for this payee in `token` (default ETH), to itself; returns the amount."""
        asset = checksummed(token, "token") if token else ETH
        value = int(self.hub.functions.balanceOf(self.address, asset).call())
        if value:
            self.transactor.send(self.hub.functions.withdraw(asset, value, self.address))
        return value

    def shutdown(self) -> None:
        self.http.close()
        self._rpc_session.close()

    def _get(self, path: str) -> dict[str, Any]:
        return self._answer(self._asked("GET", path, lambda: self.http.get(path)))

    def _post(self, path: str) -> dict[str, Any]:
        return self._answer(self._asked("POST", path, lambda: self.http.post(path, json={})))

    @staticmethod
    def _asked(method: str, path: str, call: Callable[[], httpx.Response]) -> httpx.Response:
        """The service's answer; none (out of reach, a timeout) is our 503 `service_unavailable`, not httpx's own
        error outside the SDK's root. Each call here may be asked again (a stop is final, a read changes nothing)."""
        try:
            return call()
        except httpx.TransportError as ex:
            raise unanswered(
                f"{method} {path}", f"{method} {path}: the service did not answer ({type(ex).__name__}); ask again"
            ) from ex

    @staticmethod
    def _answer(answer: httpx.Response) -> dict[str, Any]:
        if answer.status_code != 200:
            raise refusal(answer)
        return answer_object(answer)
