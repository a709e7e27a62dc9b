"""BILLING_INTAKE_WRITERS: its bounds, the fallback to one process when unpartitioned, and the
environment a writer process is given (consumers/service/writers.py)."""

from __future__ import annotations

import logging
import os

import pytest
from pydantic import SecretStr, ValidationError

from consumers.runtime.instance import ServiceUrls
from consumers.runtime.preflight import load_settings
from consumers.runtime.settings import Settings
from consumers.runtime.user_errors import UserError
from consumers.service.writers import effective_writers, writer_env


def test_default_is_one_and_bounds_are_1_to_16(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().intake_writers == 1
    assert Settings(intake_writers=16).intake_writers == 16
    for bad in (0, 17, -1):
        with pytest.raises(ValidationError):
            Settings(intake_writers=bad)
    monkeypatch.setenv("BILLING_INTAKE_WRITERS", "17")
    with pytest.raises(UserError, match="BILLING_INTAKE_WRITERS"):
        load_settings()
    monkeypatch.setenv("BILLING_INTAKE_WRITERS", "3")
    assert load_settings().intake_writers == 3


@pytest.mark.parametrize("partitions", [0, 1])
def test_fewer_than_two_units_run_one_process_with_one_warning(
    partitions: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="billing.writers")
    assert effective_writers(Settings(intake_writers=4, intake_partitions=partitions)) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "BILLING_INTAKE_WRITERS=4" in warnings[0].getMessage()


def test_partitioned_runs_what_is_asked_and_one_writer_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="billing.writers")
    assert effective_writers(Settings(intake_writers=2, intake_partitions=8)) == 2
    assert effective_writers(Settings(intake_writers=1, intake_partitions=0)) == 1
    assert not caplog.records


def test_a_writer_gets_the_service_urls_and_every_setting_as_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        database_url="postgresql+psycopg://owner@db/billing",
        database_role="billing_app",
        nats_namespace="ns",
        intake_partitions=8,
        intake_writers=2,
        api_tokens=SecretStr("t" * 20 + ":wallet"),
    )
    urls = ServiceUrls(
        database_url="postgresql+psycopg://billing_svc@/billing?host=/s", nats_url="nats://n:1", embedded=()
    )
    env = writer_env(settings, urls, {"PATH": "/bin", "BILLING_STRIPE_API_BASE": "stale"})
    assert env["PATH"] == "/bin"
    assert env["BILLING_DATABASE_URL"] == urls.database_url
    assert env["BILLING_NATS_URL"] == "nats://n:1"
    assert env["BILLING_INTAKE_WRITERS"] == "1"  # a writer spawns none
    assert "BILLING_STRIPE_API_BASE" not in env  # unset in the parent's settings

    # What the writer process reads back: the parent's settings, but for the URLs and its one writer.
    for key in [k for k in os.environ if k.startswith("BILLING_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    child = Settings()
    same = {"database_url", "nats_url", "intake_writers"}
    assert child.model_dump(exclude=same) == settings.model_dump(exclude=same)
    assert child.api_tokens.get_secret_value() == settings.api_tokens.get_secret_value()
