"""Schemathesis against our own OpenAPI document: generated requests, valid and invalid, never reach a 500, and every
answer matches what the document promises (status codes, content types, response schemas).

The schema is loaded from the running app inside the test (schemathesis' lazy `from_fixture` does not work with
pytest 9), and each operation's cases are drawn with Hypothesis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.checks import positive_data_acceptance
from schemathesis.openapi import from_asgi

from settlement.api.app import create_app
from settlement.api.routes import router
from settlement.server.config import Settings

pytestmark = pytest.mark.parametrize("module_store_url", ["sqlite"], indirect=True)

OPERATIONS = [route.operation_id for route in router.routes if isinstance(route, APIRoute)]  # every one we serve
# An address in mixed case must carry a correct EIP-55 checksum, which a JSON Schema pattern cannot say: generated
# mixed-case addresses are (rightly) refused, so "schema-valid data is accepted" does not hold for these.
CHECKSUMMED = {"listChannels", "getPayeeSummary", "signInChallenge"}


@pytest.fixture(scope="module")
def client(module_service_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """One app for every operation's cases. Reads of made-up channel ids and API keys are budgeted per process (503
    `unknown_channels_busy` and `unknown_keys_busy` beyond, documented, which schemathesis counts as server errors),
    and all the operations' cases now share one process's budgets: not the subject."""
    settings = module_service_settings(
        access_control=True, unknown_channel_reads_per_second=10_000, unknown_key_reads_per_second=10_000
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as running:
        yield running


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_generated_requests_get_documented_answers_and_no_server_error(client: TestClient, operation_id: str) -> None:
    # Its lifespan has started the service; schemathesis calls the same app.
    operation = from_asgi("/openapi.json", client.app).find_operation_by_id(operation_id)

    @given(case=operation.as_strategy())
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Case[Any]) -> None:
        case.call_and_validate(excluded_checks=[positive_data_acceptance] if operation_id in CHECKSUMMED else [])

    check()
