"""Signing in to a settlement service with the account's own key, as an `httpx.Auth`: a request the service answers
401 is sent again with a sign-in token, got by signing the service's EIP-4361 challenge (docs/security.md). A payer
or payee needs nothing from the operator to read its own channels.

Before signing, the challenge is checked to be a sign-in of this account at this service's host on the expected
chain: a service cannot make the key sign anything else (another site's sign-in, a message of its choosing).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Generator
from typing import Any

import httpx
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from settlement.errors import UntrustedServiceError, rejected
from settlement.sdk.answers import answer_object, json_of, service_text

RENEW_BEFORE_SECONDS = 30  # a token this close to its expiry is renewed before use


class SignInAuth(httpx.Auth):
    """Bearer tokens for `account` at the service `service_url` (on chain `chain_id`, when known)."""

    requires_response_body = True

    def __init__(self, account: LocalAccount, service_url: str, chain_id: int | None = None) -> None:
        self.account = account
        self.service = httpx.URL(service_url.rstrip("/") + "/")
        self.chain_id = chain_id
        self._token: str | None = None
        self._expires = 0.0
        self._guard = threading.Lock()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._current()
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        asked = yield httpx.Request(
            "POST", self.service.join("v1/auth/challenge"), json={"address": self.account.address}
        )
        message = service_text(_answer(asked), "message")
        self._check(message)
        signature = self.account.sign_message(encode_defunct(text=message)).signature.to_0x_hex()
        granted = _answer(
            (
                yield httpx.Request(
                    "POST", self.service.join("v1/auth/token"), json={"message": message, "signature": signature}
                )
            )
        )
        token, expires = service_text(granted, "token"), granted.get("expiresAt")
        if not isinstance(expires, int) or isinstance(expires, bool):  # unix seconds, as the service sends them
            raise UntrustedServiceError(f"the service's sign-in token expires at {str(expires)[:40]!r}, not a time")
        with self._guard:
            self._token, self._expires = token, float(expires)
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def _current(self) -> str | None:
        with self._guard:
            return self._token if time.time() < self._expires - RENEW_BEFORE_SECONDS else None

    def _check(self, message: str) -> None:
        lines = message.split("\n")
        host = self.service.netloc.decode()
        # CAIP-2's longest reference at most: int() of 5,000 digits raised
        chain = re.search(r"^Chain ID: ([1-9][0-9]{0,31})$", message, re.MULTILINE)
        if (
            len(lines) < 2
            or lines[0] != f"{host} wants you to sign in with your Ethereum account:"
            or lines[1] != self.account.address
            or chain is None
            or (self.chain_id is not None and int(chain.group(1)) != self.chain_id)
        ):
            raise UntrustedServiceError(
                f"the service at {self.service} asked {self.account.address} to sign a message that is not a sign-in "
                f"of this account at {host}" + (f" on chain {self.chain_id}" if self.chain_id else "")
            )


def _answer(response: httpx.Response) -> dict[str, Any]:
    response.read()
    if response.status_code != 200:
        try:
            body = json_of(response)
            code, text = str(body["code"]), str(body["message"])
        except (ValueError, KeyError, TypeError):
            code, text = "service_unavailable", f"sign-in answered {response.status_code}"
        raise rejected(response.status_code, code, text, request=f"{response.request.method} {response.request.url}")
    return answer_object(response)
