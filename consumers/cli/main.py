"""The `billing` console command."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Annotated

import typer

from consumers.runtime.user_errors import INTERNAL_ERROR_EXIT, USER_ERROR_EXIT, UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    # consumers.cli.main turns exceptions into one line; a traceback only with --debug / BILLING_DEBUG=1.
    pretty_exceptions_enable=False,
    help="Billing and metering service of the GPU cloud.",
)


def _add_subcommands() -> None:
    from consumers.cli.dlq import dlq_app

    app.add_typer(dlq_app, name="dlq")
    from consumers.cli.report import report_app

    app.add_typer(report_app, name="report")
    from devtools.demo import demo

    app.command("demo")(demo)


_add_subcommands()


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pgserver logs every pg_ctl command line at INFO; keep its warnings only.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    # alembic names each of its plugins at INFO before every migration run.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


@app.command()
def migrate(
    database_url: str = typer.Option(None, envvar="BILLING_DATABASE_URL", help="Owner's URL of the database."),
) -> None:
    """Upgrade the database schema to the newest revision (runs as the URL's login, the owner)."""
    import psycopg
    from sqlalchemy.exc import DBAPIError, OperationalError

    from consumers.runtime.preflight import check_database_url, probe_database, redacted_database_url
    from ledger.migrate import upgrade

    _logging()
    if not database_url:
        raise UserError("BILLING_DATABASE_URL is not set (or pass --database-url)")
    # The URL as `billing up` takes it (postgres:// rewritten, other schemes refused), and a wrong
    # or unreachable server as one line before Alembic starts.
    url = check_database_url(database_url)
    probe_database(url)
    try:
        upgrade(url)
    except DBAPIError as exc:
        if not isinstance(exc, OperationalError) and not isinstance(exc.orig, psycopg.errors.InsufficientPrivilege):
            raise  # a bug in a migration, not a mistake of the person running it
        # The server went away halfway, or the login is not the schema's owner.
        reason = " ".join(str(exc.orig or exc).split())[:200]
        raise UserError(f"BILLING_DATABASE_URL: migration failed: {reason} ({redacted_database_url(url)})") from None
    typer.echo("database schema is at the newest revision")


@app.command()
def up() -> None:
    """Run the service: migrations, then everything the service does, until SIGTERM, SIGINT
    (Ctrl-C) or SIGHUP.

    With BILLING_DATABASE_URL / BILLING_NATS_URL unset, starts embedded servers under
    BILLING_DATA_DIR (default .billing); one `billing up` per data dir."""
    from consumers.runtime.preflight import load_settings
    from consumers.service.up import run_up

    _logging()
    try:
        code = run_up(load_settings())
    except KeyboardInterrupt:  # Ctrl-C before the service's own handlers are in place: nothing runs yet
        code = 130
    if code:
        raise typer.Exit(code)


@app.command()
def verify(
    database_url: str = typer.Option(None, envvar="BILLING_DATABASE_URL", help="Owner's URL of the database."),
    keep: bool = typer.Option(False, "--keep", help="Keep the scratch schema verify_<random> to look at."),
    wallet: Annotated[
        list[str] | None, typer.Option("--wallet", help="Only this wallet (repeatable); default: all.")
    ] = None,
    limit: int = typer.Option(10, "--limit", help="Differing rows shown per table."),
) -> None:
    """Rebuild the journal and every projection from the event log alone into a scratch schema and
    report any difference (exit 1 if something differs, 2 if verify cannot run).

    Finds the database like every one-shot command: the URL given, else the running `billing up`
    of BILLING_DATA_DIR, else the embedded database of the data dir."""
    from consumers.runtime.instance import client_services
    from consumers.runtime.preflight import load_settings
    from projections.verify import verify_command

    settings = load_settings(**({"database_url": database_url} if database_url else {}))
    with client_services(settings, need_nats=False) as urls:
        code = verify_command(urls.database_url, keep=keep, wallets=wallet or (), limit=limit)
    raise typer.Exit(code)


@app.command()
def token() -> None:
    """Print the development token of the data dir (embedded mode, BILLING_API_TOKENS unset):
    `curl -H "Authorization: Bearer $(billing token)" ...`."""
    from consumers.runtime.preflight import load_settings
    from consumers.service.up import DEV_TOKEN_FILE, read_dev_token

    settings = load_settings()
    found = read_dev_token(settings.data_dir)
    if found is None:
        raise UserError(
            f"no development token in {settings.data_dir / DEV_TOKEN_FILE}: `billing up` makes one in embedded mode "
            "when BILLING_API_TOKENS is unset (otherwise use a token of BILLING_API_TOKENS)"
        )
    typer.echo(found)


@app.command()
def status(
    output: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Whether `billing up` runs on BILLING_DATA_DIR: its pid, HTTP and NATS addresses, readiness,
    versions and intake lag. Exit 0 running and ready, 1 not running, 3 running but not ready."""
    from consumers.cli.status import print_status

    if output not in ("table", "json"):
        raise UserError(f"--format: {output!r} is not one of table, json")
    raise typer.Exit(print_status(output))


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("BILLING_DEBUG", "").strip().lower() in ("1", "true", "yes")


def main() -> None:
    """The console entry point: expected mistakes as one line and exit 2, a bug as one line and
    exit 1, the traceback only with ``--debug`` (anywhere on the line) or ``BILLING_DEBUG=1``.
    Usage errors are Typer's own (exit 2)."""
    argv = sys.argv[1:]
    debug = _debug_requested(argv)
    if "--debug" in argv:
        sys.argv = [sys.argv[0], *(a for a in argv if a != "--debug")]
    try:
        app()  # standalone: Typer prints usage errors itself and exits through SystemExit
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(
            f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(a bug; run again with --debug or BILLING_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(INTERNAL_ERROR_EXIT)


if __name__ == "__main__":
    main()
