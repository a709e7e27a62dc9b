"""The checks `billing up` makes before anything starts (consumers/service/up.py): URLs, tokens, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from consumers.runtime.preflight import (
    check_database_url,
    data_dir_lock,
    load_settings,
    lock_holder,
    redacted_database_url,
    redacted_nats_url,
)
from consumers.runtime.settings import Settings
from consumers.runtime.user_errors import UserError
from consumers.service.up import check_tokens, dev_token


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u:p@db:5432/billing", "postgresql+psycopg://u:p@db:5432/billing"),
        ("postgresql://u@db/billing", "postgresql+psycopg://u@db/billing"),
        ("postgresql+psycopg://u@db/billing", "postgresql+psycopg://u@db/billing"),
    ],
)
def test_postgres_schemes_are_rewritten_to_the_driver_of_the_service(given: str, used: str) -> None:
    assert check_database_url(given) == used


@pytest.mark.parametrize("url", ["mysql://u@db/x", "postgresql+asyncpg://u@db/x", "just words"])
def test_other_database_urls_are_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(UserError, match=r"^BILLING_DATABASE_URL: .*postgresql\+psycopg://"):
        check_database_url(url)


def test_passwords_never_reach_the_log_or_runtime_json() -> None:
    assert "s3cret" not in redacted_database_url("postgresql+psycopg://u:s3cret@db/x")
    shown = redacted_nats_url("nats://a:s3cret@n1:4222,nats://tok3n@n2:4222,nats://n3:4222")
    assert shown == "nats://a:***@n1:4222,nats://***@n2:4222,nats://n3:4222"


def test_short_tokens_are_refused_outside_embedded_mode_only() -> None:
    short = Settings(api_tokens=SecretStr("x" * 20 + ":wallet;abc:finance"))
    with pytest.raises(UserError, match=r"BILLING_API_TOKENS entry 2: the token has 3 characters"):
        check_tokens(short, embedded_database=False)
    check_tokens(short, embedded_database=True)
    with pytest.raises(UserError, match="BILLING_API_TOKENS entry 1: scopes must be among"):
        check_tokens(Settings(api_tokens=SecretStr("y" * 20 + ":admin")), embedded_database=True)


def test_bad_environment_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_CONNECT_TIMEOUT_S", "-1")
    with pytest.raises(UserError, match=r"^BILLING_CONNECT_TIMEOUT_S: "):
        load_settings()


def test_the_data_dir_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    import os

    assert lock_holder(tmp_path) is None
    with data_dir_lock(tmp_path):
        assert lock_holder(tmp_path) == os.getpid()
        refused = rf"already running on data dir .* \(pid {os.getpid()}, still starting"
        with pytest.raises(UserError, match=refused), data_dir_lock(tmp_path):
            pass
    assert lock_holder(tmp_path) is None


def test_the_development_token_is_kept_private_and_reused(tmp_path: Path) -> None:
    token = dev_token(tmp_path)
    assert len(token) >= 16
    assert dev_token(tmp_path) == token
    assert (tmp_path / "dev-token").stat().st_mode & 0o777 == 0o600
