"""py-spy on the running `billing up` (bench/bench_e2e.py --profile): record while the burst is
processed, then aggregate the collapsed stacks (``--format raw``) into own and total time per
function, per thread and per area.

py-spy samples the process from outside at 100 Hz, twice side by side (see :class:`PySpy`): the CPU
profile (threads py-spy sees running) gives the function tables, as shares of the CPU samples; the
``--idle`` recording gives the wall-clock view, where a sample whose top frame is a known wait is
classified as such: the event loop waiting in ``epoll`` (nothing to do), a worker thread waiting for
work (``concurrent.futures`` queue), a thread waiting for PostgreSQL's answer (psycopg's ``wait``),
other waits (locks, sleeps). Any other sample counts as CPU there, including a thread that waits for
the GIL or for a core.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \(\d+\): ?(?P<name>.*)$")
_PROJECT = ("ledger/", "projections/", "consumers/")


class PySpy:
    """Two ``py-spy record --format raw --threads --nonblocking -p PID`` side by side until
    :meth:`stop` (SIGINT makes them write): ``<out>.cpu.txt`` with running threads only (py-spy's
    own idle detection: the CPU profile) and ``<out>.wall.txt`` with ``--idle`` (every thread at
    every sample: the wall-clock view). ``--nonblocking``: the process is never paused (in blocking
    mode py-spy also misreports idle threads as busy here)."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.pid = pid
        self.cpu = out.with_suffix(".cpu.txt")
        self.wall = out.with_suffix(".wall.txt")
        self.rate = rate
        self.log = out.with_suffix(".log")
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        with self.log.open("wb") as log:
            for path, extra in ((self.cpu, []), (self.wall, ["--idle"])):
                cmd = [str(exe), "record", "--format", "raw", "--threads", "--nonblocking", *extra]
                cmd += ["--rate", str(self.rate), "-o", str(path), "-p", str(self.pid)]
                self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(0.5)  # attached and sampling before the burst starts
        if any(p.poll() is not None for p in self.procs):
            self.stop()
            raise RuntimeError(f"py-spy exited at once: {self.log.read_text()[-400:]}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs = []


WAIT_LOOP = "event loop idle (epoll: waiting for NATS, HTTP or a worker thread)"
WAIT_WORK = "worker thread idle (no work queued)"
WAIT_PG = "waiting for PostgreSQL (psycopg wait: query, commit)"
WAIT_OTHER = "other waits (locks, sleeps, events)"


def _wait_kind(frames: list[str]) -> str | None:
    if not frames:
        return WAIT_OTHER
    leaf = frames[-1]
    if leaf.startswith(("EpollSelector.select", "select (selectors")):
        return WAIT_LOOP
    if leaf.startswith("_worker (concurrent/futures/thread"):
        return WAIT_WORK
    if "psycopg" in leaf and (leaf.startswith(("Connection.wait", "wait", "BaseConnection.wait")) or "waiting" in leaf):
        return WAIT_PG
    if leaf.startswith(("Condition.wait", "Event.wait", "Lock.acquire", "sleep", "Thread.join", "_wait_for_tstate")):
        return WAIT_OTHER
    return None


@dataclass
class Profile:
    samples: int
    """CPU samples (waits excluded)."""
    own: collections.Counter[str]
    total: collections.Counter[str]
    threads: collections.Counter[str]
    """CPU samples per thread (group)."""
    areas: collections.Counter[str]
    waits: collections.Counter[tuple[str, str]]
    """(thread group, wait kind) -> samples."""
    thread_ids: dict[str, set[str]]
    stacks: list[tuple[list[str], int]]
    """CPU stacks (frames root first) with their sample counts."""

    def children(self, parent: str) -> collections.Counter[str]:
        """CPU samples under ``parent`` (a function name prefix) split by its direct callee."""
        out: collections.Counter[str] = collections.Counter()
        for frames, count in self.stacks:
            for i, f in enumerate(frames):
                if f.startswith(parent):
                    out[frames[i + 1] if i + 1 < len(frames) else "(itself)"] += count
                    break
        return out


def _frame(raw: str) -> str:
    m = _FRAME.match(raw)
    return f"{m['func']} ({m['file']})" if m else raw


def _thread(raw: str) -> str:
    m = _THREAD.match(raw)
    name = m["name"] if m else raw
    # "billing-db_3" -> "billing-db_*": the worker threads of the event loop's executor
    return re.sub(r"_\d+$", "_*", name) or "?"


def _area(frames: list[str]) -> str:
    """Where a sample's CPU goes, by the innermost frame that says it (a coarse breakdown)."""
    for f in reversed(frames):
        if "psycopg" in f:
            return "psycopg (driver: send, receive, adapt)"
        if "sqlalchemy" in f:
            return "sqlalchemy (pool, connection)"
        if "pydantic" in f or "parse_event" in f or "validate_json" in f or "event_to_json" in f:
            return "event parsing/serialising (pydantic)"
        if "nats/" in f:
            return "nats-py (protocol, acks, publishes)"
        if "projections/rules.py" in f or "ledger/money.py" in f or "ledger/journal.py" in f:
            return "wallet rules (pure decisions, journal)"
        if "projections/wallet_store.py" in f:
            return "wallet load/save (Python side)"
        if "ledger/store.py" in f:
            return "append_new (Python side: COPY rows)"
        if "projections/processor.py" in f or "projections/outbox.py" in f:
            return "processor (Python side)"
        if "consumers/nats/intake.py" in f:
            return "intake loop (Python side)"
        if "consumers/" in f:
            return "other service loops (relay, scheduler, HTTP)"
        if "uvicorn" in f or "fastapi" in f or "starlette" in f:
            return "HTTP"
    if any("asyncio" in f or "selectors" in f for f in frames):
        return "asyncio event loop itself"
    return "other"


def load(path: Path) -> Profile:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    waits: collections.Counter[tuple[str, str]] = collections.Counter()
    thread_ids: dict[str, set[str]] = collections.defaultdict(set)
    stacks: list[tuple[list[str], int]] = []
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        parts = stack.split(";")
        thread, frames = _thread(parts[0]), [_frame(f) for f in parts[1:]]
        thread_ids[thread].add(parts[0].split(")")[0])
        wait = _wait_kind(frames)
        if wait is not None:
            waits[(thread, wait)] += count
            continue
        waits[(thread, "CPU")] += count
        stacks.append((frames, count))
        samples += count
        threads[thread] += count
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
        areas[_area(frames)] += count
    return Profile(samples, own, total, threads, areas, waits, dict(thread_ids), stacks)


# Entry points that only wrap everything below them: left out of the "total" table.
_WRAPPERS = ("main (consumers/cli", "up (consumers/cli", "run (consumers/intake", "Intake.run (", "run_service (")
# The two halves of the intake's critical path, broken down by direct callee.
_SLICES = ("process_batch (projections/processor", "Intake._handle (consumers/intake")


def report(spy: PySpy, seconds: float, service_cores: float | None = None, top: int = 10) -> list[str]:
    """The summary printed by the bench. ``service_cores``: the service's CPU seconds per second
    measured by the kernel (psutil) over the same burst, printed beside py-spy's figure."""
    try:
        p, wall = load(spy.cpu), load(spy.wall)
    except FileNotFoundError as exc:
        return [f"py-spy: no output ({exc})"]
    if p.samples == 0:
        return [f"py-spy: no CPU samples in {spy.cpu}"]
    pct = 100.0 / p.samples
    measured = f"; the kernel counted {service_cores:.2f} cores on CPU" if service_cores is not None else ""
    lines = [
        f"py-spy on billing up during the burst ({seconds:.1f} s, 100 Hz): {p.samples:,} active samples "
        f"(= {p.samples / 100 / seconds:.2f} threads running or runnable on average{measured})",
        f"  raw stacks: {spy.cpu}, {spy.wall}",
        "  wall-clock view (--idle; thread-seconds per second of burst; 'CPU' here also counts a thread"
        " waiting for the GIL or for a core):",
    ]
    for thread in sorted(wall.thread_ids, key=lambda t: -sum(v for (th, _), v in wall.waits.items() if th == t)):
        kinds = sorted(((k, v) for (th, k), v in wall.waits.items() if th == thread), key=lambda kv: -kv[1])
        lines.append(
            f"    {thread} ({len(wall.thread_ids[thread])} thread(s)): "
            + "; ".join(f"{k} {v / 100 / seconds:.2f}" for k, v in kinds if v / 100 / seconds >= 0.005)
        )
    lines += [
        "  CPU samples by thread: " + ", ".join(f"{name} {n * pct:.0f}%" for name, n in p.threads.most_common(6)),
        "  CPU by area (innermost frame that names it):",
        *(f"    {n * pct:5.1f}%  {area}" for area, n in p.areas.most_common()),
        f"  top {top} functions by own CPU (the frame on top of the stack):",
        *(f"    {n * pct:5.1f}%  {f}" for f, n in p.own.most_common(top)),
        f"  top {top} service functions by total CPU (self + callees; ledger/, projections/, consumers/):",
        *(
            f"    {n * pct:5.1f}%  {f}"
            for f, n in [
                (f, n)
                for f, n in p.total.most_common()
                if f.split("(")[-1].startswith(_PROJECT) and not f.startswith(_WRAPPERS)
            ][:top]
        ),
    ]
    for parent in _SLICES:
        kids = p.children(parent)
        if kids:
            lines.append(f"  {parent.split(' ')[0]} ({sum(kids.values()) * pct:.1f}% of CPU) by direct callee:")
            lines += [f"    {n * pct:5.1f}%  {f}" for f, n in kids.most_common() if n * pct >= 0.5]
    return lines
