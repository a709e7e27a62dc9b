"""`billing up` from start to stop: the checks before anything starts, one instance per data dir,
bounded first connects, the embedded servers' lifetime, and the stop at any moment.

In order: the settings are checked (URL scheme, tokens, HTTP port, data dir; each mistake one line
naming the setting, exit 2); with an embedded server, the data dir's lock is taken
(``<data_dir>/billing.lock``, an ``fcntl.flock`` held for the process's life) before any embedded
server is started or a leftover of a dead instance stopped, so a second ``billing up`` on the same
data dir is refused and never touches the running one's servers; the embedded servers start; the
first connects to PostgreSQL and NATS are retried for ``connect_timeout_s`` with a log line per
attempt; migrations run as the owner; in embedded mode the service then logs in as ``billing_svc``
(not a superuser, member of ``billing_app``); ``runtime.json`` says where everything is; then
``consumers.service.run.run_service`` runs until a signal.

SIGTERM, SIGINT and SIGHUP set one ``stop`` event from the first instruction of the event loop on:
a start-up step in hand (an embedded server starting, the migrations; each bounded by its own
timeout) is finished, then everything started so far is stopped in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import psycopg
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from consumers.runtime.errors import Backoff
from consumers.runtime.instance import EMBEDDED_DB_NAME, ServiceUrls, ensure_database, write_runtime_file
from consumers.runtime.loops import wait_any
from consumers.runtime.preflight import (
    check_data_dir,
    check_http_port,
    data_dir_lock,
    database_failure,
    redacted_database_url,
    redacted_nats_url,
)
from consumers.runtime.settings import Settings, nats_servers
from consumers.runtime.user_errors import UserError

log = logging.getLogger("billing")

T = TypeVar("T")

DEV_TOKEN_FILE: Final = "dev-token"
# The login of the service on the embedded server (created at the first start): no superuser, so
# `RESET ROLE` gives back nothing beyond billing_app's privileges.
SERVICE_LOGIN: Final = "billing_svc"
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Tokens shorter than this are refused outside embedded mode (a guessable bearer token is no token).
MIN_TOKEN_CHARS: Final = 16
# One connect attempt may take at most this long (less when the deadline is nearer).
CONNECT_ATTEMPT_MAX_S: Final = 3.0
# Pause between connect attempts: doubling from the first, capped.
CONNECT_RETRY_FIRST_S: Final = 0.5
CONNECT_RETRY_MAX_S: Final = 2.0
# Threads for the blocking start-up steps (embedded servers, migrations, connects).
STARTUP_THREADS: Final = 2


class Stopped(Exception):
    """A stop signal arrived during the start: unwind what has been started."""


# --------------------------------------------------------------------------------------------------
# Checks before anything starts
# --------------------------------------------------------------------------------------------------


def check_tokens(settings: Settings, *, embedded_database: bool) -> None:
    """BILLING_API_TOKENS well formed; outside embedded mode, every token at least 16 characters."""
    from consumers.http.auth import parse_api_tokens

    spec = settings.api_tokens.get_secret_value()
    try:
        parse_api_tokens(spec)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if embedded_database:
        return
    entries = [e.strip() for e in spec.split(";") if e.strip()]
    for position, entry in enumerate(entries, start=1):
        token = entry.rpartition(":")[0].strip()
        if len(token) < MIN_TOKEN_CHARS:
            raise UserError(
                f"BILLING_API_TOKENS entry {position}: the token has {len(token)} characters, at least "
                f"{MIN_TOKEN_CHARS} are needed (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )


def warn_missing_secrets(settings: Settings) -> None:
    """One warning per missing token, secret or key, saying what does not work without it."""
    if not settings.api_tokens.get_secret_value():
        log.warning("BILLING_API_TOKENS is not set: every API call but /healthz, /readyz and /metrics answers 401")
    if not settings.stripe_webhook_secret.get_secret_value():
        log.warning(
            "BILLING_STRIPE_WEBHOOK_SECRET is not set: POST /stripe/webhook answers 503, Stripe's payments, "
            "refunds and disputes are not booked"
        )
    if not settings.stripe_api_key.get_secret_value():
        log.warning(
            "BILLING_STRIPE_API_KEY is not set: top-ups by card (POST /wallet/create-intent, confirm) and the "
            "Stripe reconciliation answer 503"
        )


# --------------------------------------------------------------------------------------------------
# One instance per data dir
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Bounded first connects
# --------------------------------------------------------------------------------------------------


async def connect_database(url: str, timeout_s: float, stop: asyncio.Event, setting: str) -> None:
    """One successful connect to PostgreSQL within ``timeout_s``, a log line per failed attempt."""
    parsed = make_url(url)
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    shown = redacted_database_url(url)

    def connect_once(limit_s: float) -> None:
        with psycopg.connect(conninfo, connect_timeout=max(1, round(limit_s))) as conn:
            conn.execute("SELECT 1")

    async def attempt(limit_s: float) -> None:
        await asyncio.to_thread(connect_once, limit_s)

    async def failed(exc: Exception) -> str | None:
        reason = database_failure(parsed, exc) if isinstance(exc, psycopg.Error) else None
        if reason is not None:
            raise UserError(f"{setting}: {reason} ({shown})")
        return " ".join(str(exc).split())[:200] or type(exc).__name__

    await _retry_connect(f"PostgreSQL at {shown}", setting, timeout_s, stop, attempt, failed)


async def connect_nats(url: str, timeout_s: float, stop: asyncio.Event) -> None:
    """One successful connect to NATS within ``timeout_s`` (the broker's own connect retries for ever
    and logs nothing), a log line per failed attempt."""
    import nats
    import nats.errors

    servers = nats_servers(url)
    errors: list[Exception] = []

    async def quiet(exc: Exception) -> None:  # nats-py would log each refused connect with a traceback
        errors.append(exc)

    async def attempt(limit_s: float) -> None:
        errors.clear()
        # max_reconnect_attempts=0 would mean "for ever" to nats-py's first connect; 1 is one retry.
        nc = await nats.connect(
            servers=servers,
            allow_reconnect=False,
            connect_timeout=max(0.5, limit_s / 2),
            max_reconnect_attempts=1,
            reconnect_time_wait=0.05,
            error_cb=quiet,
        )
        await nc.close()

    async def failed(exc: Exception) -> str | None:
        cause = errors[-1] if errors else exc
        if any(isinstance(e, nats.errors.Error) and "authorization" in str(e).lower() for e in (*errors, exc)):
            raise UserError(f"BILLING_NATS_URL: authorization refused by {redacted_nats_url(url)}")
        return " ".join(str(cause).split())[:200] or type(cause).__name__

    await _retry_connect(f"NATS at {redacted_nats_url(url)}", "BILLING_NATS_URL", timeout_s, stop, attempt, failed)


async def _retry_connect(
    what: str,
    setting: str,
    timeout_s: float,
    stop: asyncio.Event,
    attempt: Callable[[float], Awaitable[None]],
    failed: Callable[[Exception], Awaitable[str | None]],
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    backoff = Backoff(CONNECT_RETRY_FIRST_S, CONNECT_RETRY_MAX_S, jitter=0.0)
    for number in range(1, 10_000):  # bounded by the deadline long before this
        if stop.is_set():
            raise Stopped
        limit_s = max(0.5, min(CONNECT_ATTEMPT_MAX_S, deadline - loop.time()))
        try:
            await _unless_stopped(attempt(limit_s), stop)
            return
        except (Stopped, UserError):
            raise
        except Exception as exc:
            reason = await failed(exc)
        left = deadline - loop.time()
        if left <= 0:
            raise UserError(
                f"{setting}: cannot connect to {what} within {timeout_s:g} s ({reason}); is it running? "
                "(BILLING_CONNECT_TIMEOUT_S sets the bound)"
            )
        wait_s = min(backoff.next(), left)
        log.warning("cannot connect to %s (attempt %d: %s); again in %.1f s", what, number, reason, wait_s)
        await wait_any(stop, seconds=wait_s)
    raise UserError(f"{setting}: cannot connect to {what}")


async def _unless_stopped(aw: Any, stop: asyncio.Event) -> Any:
    """Await ``aw`` unless ``stop`` is set first (then cancel it and raise Stopped)."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise Stopped


# --------------------------------------------------------------------------------------------------
# Embedded mode: the service's own login, the development token
# --------------------------------------------------------------------------------------------------


def ensure_service_login(owner_url: str) -> str:
    """Create (or re-assert) ``billing_svc`` on the embedded server as its superuser owner: LOGIN,
    no superuser or other attribute, member of billing_app; return the service's URL with that
    login. The embedded server trusts its unix socket, so the login has no password."""
    plain = make_url(owner_url).set(drivername="postgresql").render_as_string(hide_password=False)
    attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"
    with psycopg.connect(plain, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (SERVICE_LOGIN,)).fetchone()
        if exists is None:
            conn.execute(f"CREATE ROLE {SERVICE_LOGIN} {attributes}")
            log.info("created the service's login %s (not a superuser; member of billing_app)", SERVICE_LOGIN)
        else:  # whatever was done to it since, it gets no more than this
            conn.execute(f"ALTER ROLE {SERVICE_LOGIN} {attributes}")
        conn.execute(f"GRANT billing_app TO {SERVICE_LOGIN}")
    return make_url(owner_url).set(username=SERVICE_LOGIN).render_as_string(hide_password=False)


def dev_token(data_dir: Path) -> str:
    """The development token of ``<data_dir>/dev-token`` (mode 0600), made on first use."""
    path = data_dir / DEV_TOKEN_FILE
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if len(token) >= MIN_TOKEN_CHARS:
            return token
    token = secrets.token_urlsafe(24)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    path.with_suffix(".tmp").replace(path)
    return token


def read_dev_token(data_dir: Path) -> str | None:
    with contextlib.suppress(OSError):
        token = (data_dir / DEV_TOKEN_FILE).read_text().strip()
        return token or None
    return None


# --------------------------------------------------------------------------------------------------
# The lifetime
# --------------------------------------------------------------------------------------------------


def run_up(settings: Settings) -> int:
    """`billing up`: returns the exit status (0 after a requested stop); mistakes raise UserError."""
    embedded_db, embedded_nats = not settings.database_url, not settings.nats_url
    check_tokens(settings, embedded_database=embedded_db)
    check_data_dir(settings.data_dir)
    # The lock guards the embedded servers of the data dir. With both URLs configured the data dir
    # holds only runtime.json, and several instances of one deployment may share it.
    lock = data_dir_lock(settings.data_dir) if embedded_db or embedded_nats else contextlib.nullcontext()
    with lock:
        check_http_port(settings)  # after the lock: a second start on the same port is "already running"
        return asyncio.run(_up(settings))


async def _up(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.info("%s received: already stopping", sig.name)
            return
        log.info("%s received: stopping", sig.name)
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    executor = ThreadPoolExecutor(STARTUP_THREADS, "billing-start")
    try:
        with contextlib.ExitStack() as stack:
            try:
                return await _start_and_run(settings, stop, stack, executor)
            except Stopped:
                log.info("stopped during the start")
                return 0
    finally:
        executor.shutdown(wait=False)


async def _step(stop: asyncio.Event, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """A blocking start-up step in a thread, finished even when a stop signal arrives meanwhile (each
    is bounded by its own timeout); then the stop is honoured."""
    if stop.is_set():
        raise Stopped
    result = await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    if stop.is_set():
        raise Stopped
    return result


async def _start_and_run(
    settings: Settings, stop: asyncio.Event, stack: contextlib.ExitStack, executor: ThreadPoolExecutor
) -> int:
    from consumers.service.run import run_service
    from ledger.migrate import upgrade

    timeout_s = settings.connect_timeout_s
    embedded: list[str] = []
    owner_url = settings.database_url
    if not owner_url:
        owner_url = await _step(stop, executor, _start_embedded_postgres, settings, stack)
        embedded.append("postgresql")
    nats_url = settings.nats_url
    if not nats_url:
        nats_url = await _step(stop, executor, _start_embedded_nats, settings, stack)
        embedded.append("nats")
    await connect_database(owner_url, timeout_s, stop, "BILLING_DATABASE_URL")
    await _step(stop, executor, upgrade, owner_url)
    log.info("migrations applied")
    service_url = owner_url
    if settings.database_url is None:
        service_url = await _step(stop, executor, ensure_service_login, owner_url)
    await connect_nats(nats_url, timeout_s, stop)
    settings = _with_dev_token(settings, embedded_database=settings.database_url is None)
    warn_missing_secrets(settings)
    http_url = f"http://{_client_host(settings.http_host)}:{settings.http_port}"
    # One-shot commands (verify, report, dlq) read the owner's URL: verify needs it; the others SET ROLE.
    stack.enter_context(write_runtime_file(settings, owner_url, nats_url, http_url))
    urls = ServiceUrls(database_url=service_url, nats_url=nats_url, embedded=tuple(embedded))

    def ready() -> None:
        print(
            f"billing ready: {http_url}  {redacted_nats_url(nats_url)}  data {settings.data_dir}  (try: billing demo)",
            flush=True,
        )

    from consumers.runtime.gc_tuning import tune_gc

    tune_gc()
    return await run_service(settings, urls, stop, on_ready=ready, connect_timeout_s=timeout_s)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - a client's address of "all"


def _with_dev_token(settings: Settings, *, embedded_database: bool) -> Settings:
    if not embedded_database or settings.api_tokens.get_secret_value():
        return settings
    token = dev_token(settings.data_dir)
    print(
        f"development token (scopes wallet,finance; `billing token` prints it again): {token}\n"
        f"  try: curl -H 'Authorization: Bearer {token}' http://{_client_host(settings.http_host)}:"
        f"{settings.http_port}/finance/trial-balance",
        flush=True,
    )
    return settings.model_copy(update={"api_tokens": SecretStr(f"{token}:wallet,finance")})


def _start_embedded_postgres(settings: Settings, stack: contextlib.ExitStack) -> str:
    from consumers.runtime.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(settings.data_dir / "postgres")
    _start_embedded("embedded PostgreSQL", pg.pgdata, pg.start, pg.stop, stack)
    url = ensure_database(pg.url, EMBEDDED_DB_NAME)
    log.info("embedded PostgreSQL running (pid %s): %s", pg.pid, url)
    return url


def _start_embedded_nats(settings: Settings, stack: contextlib.ExitStack) -> str:
    from consumers.runtime.embedded import EmbeddedNats

    wanted = settings.embedded_nats_port
    nats = EmbeddedNats(settings.data_dir / "nats", port=wanted, fallback_to_free_port=True)
    _start_embedded("embedded nats-server", nats.data_dir, nats.start, nats.stop, stack)
    if nats.port != wanted:
        log.warning(
            "embedded nats-server: port %d (BILLING_EMBEDDED_NATS_PORT) is taken; using %d instead: %s",
            wanted,
            nats.port,
            nats.url,
        )
    log.info("embedded nats-server running (pid %s): %s", nats.pid, nats.url)
    return nats.url


def _start_embedded(
    what: str, where: Path, start: Callable[[], object], stop: Callable[[], None], stack: contextlib.ExitStack
) -> None:
    """``start`` an embedded server, ``stop`` it when ``stack`` closes; one that does not start is
    the user's to fix (its data dir)."""
    from consumers.runtime.embedded import EmbeddedServerError

    stack.callback(_stopping, what, stop)
    try:
        start()
    except EmbeddedServerError as exc:
        raise UserError(f"BILLING_DATA_DIR: the {what} in {where} did not start: {_first_line(exc)}") from None


def _stopping(what: str, stop_fn: Callable[[], None]) -> None:
    log.info("stopping the %s", what)
    try:
        stop_fn()
    except Exception as exc:  # the next server must still be stopped
        log.error("stopping the %s failed: %s", what, _first_line(exc))


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def started_at() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
