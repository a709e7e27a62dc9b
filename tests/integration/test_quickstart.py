"""The README's quickstart, run literally: its commands are parsed out of README.md (the ```sh blocks
after ``<!-- quickstart: service -->`` and ``<!-- quickstart -->``), run from the repository root
against a fresh data dir on the embedded servers, and each command's output is checked. A command
added to the README without a check here fails the test, so the README cannot go stale.

What is changed from a person's terminal, and only this: the environment names a fresh data dir and
free ports (``BILLING_DATA_DIR``, ``BILLING_HTTP_PORT``, ``BILLING_EMBEDDED_NATS_PORT``; the
``:8080`` of the commands becomes the free port); ``PYTHONUNBUFFERED=1`` so the service's lines
reach its log file as they would a terminal; ``make run`` runs literally when ``make -n run`` shows
it would only start ``billing up`` (an up-to-date venv), else as ``<venv>/bin/billing up`` (so the
test never installs anything); and the service is stopped by SIGTERM to the ``billing up`` process
(the pid in ``runtime.json``), as Ctrl-C would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
READY_WITHIN_S = 120.0  # a first start: initdb, migrations, embedded NATS
COMMAND_TIMEOUT_S = 120.0
STOP_WITHIN_S = 30.0
README_HTTP_PORT = 8080

_BLOCK = re.compile(r"<!--\s*quickstart(?::\s*(?P<kind>[a-z]+))?\s*-->\s*\n+```sh\n(?P<body>.*?)```", re.DOTALL)
_READY = re.compile(r"billing ready: .*")


def quickstart_commands(readme: str) -> tuple[list[str], list[str]]:
    """(the service's commands, the commands of the other terminal, in README order)."""
    service: list[str] = []
    steps: list[str] = []
    for block in _BLOCK.finditer(readme):
        lines = [line.strip() for line in block["body"].splitlines()]
        commands = [line for line in lines if line and not line.startswith("#")]
        (service if block["kind"] == "service" else steps).extend(commands)
    return service, steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    """The quickstart in progress: the ports, the service's log, and what earlier steps found."""

    http_port: int
    nats_port: int
    data_dir: Path
    log_path: Path
    found: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass(frozen=True)
class Result:
    command: str
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> str:
        assert self.returncode == 0, f"{self.command!r} exited {self.returncode}:\n{self.stdout}\n{self.stderr}"
        return self.stdout

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.stdout.splitlines() if re.search(pattern, line, re.IGNORECASE)]


# ------------------------------------------------------------------------------------------ checks


def check_token(result: Result, run: Run) -> None:
    out = result.ok().strip()
    assert len(out.splitlines()) == 1, f"billing token prints one line, got {out!r}"
    assert len(out) >= 16, f"a development token of {len(out)} characters: {out!r}"
    assert not any(c.isspace() for c in out), f"not a token: {out!r}"
    assert out in run.log(), "billing up did not print the development token at start"
    run.found["token"] = out


def check_producer(result: Result, run: Run) -> None:
    result.ok()
    assert result.lines(r"^NATS nats://127\.0\.0\.1:" + str(run.nats_port)), result.stdout
    assert len(result.lines(r"^sent wallet\.adjusted .*20000000")) == 1, result.stdout
    assert len(result.lines(r"^admission: .*'admitted': True")) == 1, result.stdout
    assert len(result.lines(r"^sent gpu\.rental\.started ")) == 1, result.stdout
    assert len(result.lines(r"^sent gpu\.rental\.metered ")) == 3, result.stdout
    assert result.lines(r"^no stop command for pod-"), result.stdout


def check_wallet(result: Result, run: Run) -> None:
    wallet = re.search(r"/wallets/([A-Za-z0-9_-]+)", result.command)
    assert wallet is not None
    body = json.loads(result.ok())
    assert body["walletId"] == wallet[1], body
    # $20 credited; the three readings (180 s at $2/h = $0.10) may or may not be applied yet.
    assert 19_900_000 <= body["balanceMicros"] <= 20_000_000, body
    assert body["state"] == "active", body


def check_trial_balance(result: Result, run: Run) -> None:
    result.ok()
    adjustments = result.lines(r"adjustments")
    assert adjustments, result.stdout
    assert re.search(r"20\.00", adjustments[0]), result.stdout  # -$20.00: the top-up adjustment
    assert result.lines(r"w_quickstart|wallet"), result.stdout


def check_status(result: Result, run: Run) -> None:
    out = result.ok()
    assert re.search(r"\bready\b\W+yes\b", out, re.IGNORECASE), out  # the row "ready | yes (...)"
    assert f"127.0.0.1:{run.http_port}" in out, out
    assert f":{run.nats_port}" in out, out


def check_run_dry(result: Result, run: Run) -> None:
    result.ok()
    (stop,) = result.lines(r"^stop command after ")
    assert '"action": "pause"' in stop, stop
    assert '"reason": "balance_exhausted"' in stop, stop
    assert result.lines(r"^billing\.out\.notices\.w_dry: .*\"exhausted\""), result.stdout
    assert len(result.lines(r"^settled: \d+ s, \$\d")) == 1, result.stdout
    assert re.search(r"^billing\.out\.settlements\.w_dry: ", result.stdout, re.MULTILINE), result.stdout


def check_statement(result: Result, run: Run) -> None:
    out = result.ok()
    assert "w_dry" in out, out
    assert re.search(r"5\.00", out), out  # the $5 top-up adjustment


CHECKS: list[tuple[str, Callable[[Result, Run], None]]] = [
    (r"^bin/billing token$", check_token),
    (r"examples/producer\.py$", check_producer),
    (r"^curl .*/wallets/", check_wallet),
    (r"^bin/billing report trial-balance$", check_trial_balance),
    (r"^bin/billing status$", check_status),
    (r"examples/run_dry\.py$", check_run_dry),
    (r"^bin/billing report statement w_dry$", check_statement),
]


def check_for(command: str) -> Callable[[Result, Run], None]:
    for pattern, check in CHECKS:
        if re.search(pattern, command):
            return check
    pytest.fail(f"README quickstart command {command!r} has no check in tests/integration/test_quickstart.py")


# ----------------------------------------------------------------------------------------- running


def as_run_here(command: str, run: Run) -> str:
    """The README's command with this run's HTTP port, and this test's venv for `.venv/bin/`."""
    command = re.sub(rf"(127\.0\.0\.1|localhost):{README_HTTP_PORT}\b", rf"\g<1>:{run.http_port}", command)
    if VENV_BIN != ROOT / ".venv" / "bin":
        command = command.replace(".venv/bin/", f"{VENV_BIN}/")
    return command


def run_step(command: str, run: Run, env: dict[str, str]) -> Result:
    done = subprocess.run(
        ["bash", "-c", as_run_here(command, run)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    return Result(command, done.returncode, done.stdout, done.stderr)


def service_argv(command: str, env: dict[str, str]) -> list[str]:
    """`make run` literally when it would only start `billing up`; else `<venv>/bin/billing up`."""
    assert command == "make run", f"the quickstart's service command is {command!r}; this test runs `make run`"
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    planned = [line.strip() for line in dry.stdout.splitlines() if line.strip()]
    if dry.returncode == 0 and len(planned) == 1 and planned[0].endswith("billing up"):
        return ["make", "run"]
    print(f"make run would also install ({planned}); running {VENV_BIN / 'billing'} up instead")
    return [str(VENV_BIN / "billing"), "up"]


def wait_ready(proc: subprocess.Popen[bytes], run: Run) -> str:
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        ready = _READY.search(run.log())
        if ready:
            return ready[0]
        if proc.poll() is not None:
            pytest.fail(f"the service exited with {proc.returncode} before its ready line:\n{run.log()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no 'billing ready:' line within {READY_WITHIN_S:.0f} s:\n{run.log()[-4000:]}")


def stop_service(proc: subprocess.Popen[bytes], run: Run) -> int:
    """SIGTERM to `billing up` (runtime.json's pid; the process itself when it is not under make)."""
    pid = proc.pid
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = int(json.loads((run.data_dir / "runtime.json").read_text())["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return proc.wait(timeout=STOP_WITHIN_S)


@contextlib.contextmanager
def service(argv: list[str], env: dict[str, str], run: Run) -> Iterator[subprocess.Popen[bytes]]:
    with run.log_path.open("ab") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:  # the test failed before stopping it: leave nothing running
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                stop_service(proc, run)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------- tests


def test_readme_has_a_quickstart() -> None:
    service_commands, steps = quickstart_commands(README.read_text())
    assert service_commands == ["make run"]
    assert steps[0] == "bin/billing token"
    assert any(s.startswith("curl ") for s in steps)
    for command in steps:
        check_for(command)


def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    service_commands, steps = quickstart_commands(README.read_text())
    run = Run(free_port(), free_port(), tmp_path / "data", tmp_path / "service.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.update(
        {
            "BILLING_DATA_DIR": str(run.data_dir),
            "BILLING_HTTP_PORT": str(run.http_port),
            "BILLING_EMBEDDED_NATS_PORT": str(run.nats_port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    (command,) = service_commands
    with service(service_argv(command, env), env, run) as proc:
        ready = wait_ready(proc, run)
        assert f"http://127.0.0.1:{run.http_port}" in ready, ready
        assert f"nats://127.0.0.1:{run.nats_port}" in ready, ready
        for step in steps:
            check = check_for(step)
            check(run_step(step, run, env), run)
        assert stop_service(proc, run) == 0, run.log()[-4000:]
