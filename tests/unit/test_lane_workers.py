"""The lane worker processes do not outlive a kill -9 of the service process (consumers.lane_workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from consumers.lane_workers import LaneWorkers

    async def main():
        workers = LaneWorkers("postgresql+psycopg://nobody@127.0.0.1:1/none", None, 2)
        await workers.start()  # spawns and imports; connects to nothing
        print(" ".join(map(str, workers.pids)), flush=True)
        await asyncio.sleep(120)

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


def test_workers_exit_when_the_service_process_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "service.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    service = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert service.stdout is not None
        line = service.stdout.readline()  # blocks until the workers are up (or the service died)
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        assert all(_alive(p) for p in pids)
        os.kill(service.pid, signal.SIGKILL)
        service.wait(timeout=10)
        deadline = time.monotonic() + 10  # each worker checks its parent every second
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), f"workers left behind: {[p for p in pids if _alive(p)]}"
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=10)
