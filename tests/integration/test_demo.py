"""`billing demo` drives a small simulated hour through a real `billing up` subprocess (the compute
plane's side, over NATS only), and starts a service of its own when none answers."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine

from projections.reports import trial_balance
from tests.integration.jetstream import jetstream, namespace_of, query
from tests.integration.test_billing_up import BILLING, free_port, service

if TYPE_CHECKING:
    from tests.conftest import TestDatabase

pytestmark = pytest.mark.integration

DEMO_TIMEOUT_S = 90


@pytest.fixture
def demo_env(database: TestDatabase, nats_url: str, unique: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_DATABASE_URL": database.url,
            "BILLING_NATS_URL": nats_url,
            "BILLING_NATS_NAMESPACE": namespace_of(unique),
            "BILLING_HTTP_HOST": "127.0.0.1",
            "BILLING_HTTP_PORT": str(free_port()),
            "BILLING_DATA_DIR": str(tmp_path / "data"),
            "BILLING_SHUTDOWN_TIMEOUT_S": "10",
            "BILLING_INTAKE_MAX_WAIT_S": "0.2",
        }
    )
    return env


async def _demo(env: dict[str, str], run: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [BILLING, "demo", "--wallets", "20", "--minutes", "2", "--run-id", run, "--json", str(out), *args]
    return await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False
    )


def _check_ledger(engine: Engine, env: dict[str, str], run: str, summary: dict) -> None:
    """What the demo reported, read back from the database independently."""
    prefix = f"demo-{run}-"
    assert summary["ok"] is True
    # Every good event published is in the ledger, once.
    (in_ledger,) = query(engine, "SELECT count(*) FROM events WHERE wallet_id LIKE :p", p=f"{prefix}%")[0]
    assert in_ledger == summary["eventsPublished"] == summary["eventsInLedger"]
    assert summary["eventsPublished"] > 60
    # The dry wallet's pod got a stop command (stop_seq counts them) and is paused by its answer.
    status, stop_seq = query(
        engine, "SELECT status, stop_seq FROM rentals WHERE resource_id = :r", r=summary["dryRental"]
    )[0]
    assert (status, stop_seq >= 1) == ("paused", True)
    assert summary["stopsIssued"] >= 1
    assert summary["stopsAnswered"] == summary["stopsIssued"]
    # Every malformed message is dead-lettered with its reason.
    subject = f"{env['BILLING_NATS_NAMESPACE']}.billing.in.{prefix}%"
    rows = query(
        engine, "SELECT reason, count(*) FROM rejected_inputs WHERE subject LIKE :s GROUP BY reason", s=subject
    )
    letters = {str(reason): int(n) for reason, n in rows}
    assert letters == summary["deadLetters"] == summary["deadLettersExpected"]
    assert {"invalid_json", "unknown_type", "subject_mismatch", "out_of_range"} <= set(letters)
    # Money: charged exactly the contract's arithmetic, and the books balance.
    assert summary["chargedMicros"] == summary["expectedChargesMicros"] > 0
    with engine.connect() as conn:
        assert trial_balance(conn, datetime.now(UTC)).summary["totalMicros"] == 0
    assert summary["trialBalanceTotalMicros"] == 0
    assert summary["rentalAdmissions"]["refused"] >= 1  # the 8x H200 pod of a $25 wallet


async def test_demo_against_a_running_billing_up(
    demo_env: dict[str, str], nats_url: str, unique: str, app_engine: Engine, tmp_path: Path
) -> None:
    run = f"t{secrets.token_hex(4)}"
    out = tmp_path / "summary.json"
    async with jetstream(nats_url, unique):  # this test's streams, deleted afterwards
        with service(demo_env, tmp_path / "billing.log") as svc:
            svc.start()
            await svc.ready()
            result = await _demo(demo_env, run, out)
            assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{svc.log()[-3000:]}"
            assert svc.terminate() == 0
    assert "billing service found" in result.stdout
    assert "trial balance total" in result.stdout
    print(result.stdout)  # the summary table, for the record (-s)
    _check_ledger(app_engine, demo_env, run, json.loads(out.read_text()))


async def test_demo_starts_a_service_when_none_answers(
    demo_env: dict[str, str], nats_url: str, unique: str, app_engine: Engine, tmp_path: Path
) -> None:
    run = f"t{secrets.token_hex(4)}"
    out = tmp_path / "summary.json"
    async with jetstream(nats_url, unique):
        result = await _demo(demo_env, run, out)
    log = (Path(demo_env["BILLING_DATA_DIR"]) / "demo-service.log").read_text(errors="replace")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log[-3000:]}"
    assert "starting `billing up`" in result.stdout
    assert "stopped the billing service started for the demo" in result.stdout
    assert "billing stopped" in log  # SIGTERM: a clean stop
    assert not (Path(demo_env["BILLING_DATA_DIR"]) / "runtime.json").exists()
    _check_ledger(app_engine, demo_env, run, json.loads(out.read_text()))
