"""openapi.json in the repository is the API as built: regenerate it when the API changes."""

from __future__ import annotations

import json

import pytest

from devtools.export_openapi import DEFAULT_PATH, main, openapi_document, render

pytestmark = pytest.mark.unit


def test_openapi_json_is_up_to_date() -> None:
    assert DEFAULT_PATH.exists(), "openapi.json is missing: run python -m devtools.export_openapi"
    assert DEFAULT_PATH.read_text() == render(openapi_document()), (
        "openapi.json is stale: run python -m devtools.export_openapi and commit the result"
    )


def test_openapi_documents_the_contract() -> None:
    doc = json.loads(DEFAULT_PATH.read_text())
    assert set(doc["paths"]) == {
        "/wallet/create-intent",
        "/wallet/confirm",
        "/stripe/webhook",
        "/wallets/{walletId}",
        "/rentals/{resourceId}",
        "/finance/trial-balance",
        "/finance/statements/{walletId}",
        "/finance/revenue",
        "/finance/stripe-reconciliation",
        "/finance/debts",
        "/finance/rejected",
        "/finance/anomalies",
    }
    wallet = doc["components"]["schemas"]["WalletResponse"]["properties"]
    assert {"balanceMicros", "availableMicros", "holdsMicros", "burnMicrosPerHour", "projectedZeroAt", "state"} <= set(
        wallet
    )
    assert doc["paths"]["/wallets/{walletId}"]["get"]["security"] == [{"bearerToken": []}]
    assert "security" not in doc["paths"]["/stripe/webhook"]["post"]
    for path in doc["paths"].values():
        for operation in path.values():
            assert "500" not in operation["responses"]
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"
                    }


def test_check_mode_reports_stale_files(tmp_path, capsys) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n")
    assert main(["--check", str(stale)]) == 1
    assert main([str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0


def test_every_operation_with_a_token_is_guarded_before_its_body() -> None:
    """GuardMiddleware checks the token by path prefix (ROUTE_SCOPES) before the body is read: every
    operation that needs a token must fall under a prefix, with the scope the operation needs."""
    from consumers.http.auth import ROUTE_SCOPES

    doc = json.loads(DEFAULT_PATH.read_text())
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            guarded = [scope for prefix, scope in ROUTE_SCOPES.items() if path.startswith(prefix)]
            if "security" not in operation:
                assert guarded == [], f"{method} {path} needs no token but a guard prefix covers it"
                continue
            assert len(guarded) == 1, f"{method} {path} needs a token but no guard prefix covers it"
            expected = "finance" if path.startswith("/finance/") else "wallet"
            assert guarded == [expected], (method, path, guarded)
