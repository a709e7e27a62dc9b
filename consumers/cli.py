"""The `billing` console command."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import traceback
from typing import Annotated

import typer

from consumers.gc_tuning import tune_gc
from consumers.settings import Settings
from consumers.user_errors import INTERNAL_ERROR_EXIT, USER_ERROR_EXIT, UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    # consumers.cli.main turns exceptions into one line; a traceback only with --debug / BILLING_DEBUG=1.
    pretty_exceptions_enable=False,
    help="Billing and metering service of the GPU cloud.",
)


def _add_subcommands() -> None:
    from consumers.dlq_cli import dlq_app

    app.add_typer(dlq_app, name="dlq")
    from consumers.report_cli import report_app

    app.add_typer(report_app, name="report")
    from consumers.demo import demo

    app.command("demo")(demo)


_add_subcommands()


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pgserver logs every pg_ctl command line at INFO; keep its warnings only.
    logging.getLogger("pgserver").setLevel(logging.WARNING)


@app.command()
def migrate(
    database_url: str = typer.Option(None, envvar="BILLING_DATABASE_URL", help="Owner's URL of the database."),
) -> None:
    """Upgrade the database schema to the newest revision (runs as the URL's login, the owner)."""
    from ledger.migrate import upgrade

    _logging()
    if not database_url:
        typer.echo("BILLING_DATABASE_URL is not set (or pass --database-url).", err=True)
        raise typer.Exit(2)
    upgrade(database_url)
    typer.echo("database schema is at the newest revision")


@app.command()
def up() -> None:
    """Run the service: migrations, then everything the service does, until SIGTERM or Ctrl-C.

    With BILLING_DATABASE_URL / BILLING_NATS_URL unset, starts embedded servers under
    BILLING_DATA_DIR (default .billing)."""
    import signal

    from consumers.app import run_service
    from consumers.runtime import runtime_file, services
    from ledger.migrate import upgrade

    _logging()
    log = logging.getLogger("billing")
    settings = Settings()

    def stop_during_start(signum: int, _frame: object) -> None:
        # Before the service runs (embedded servers starting, migrations): unwind and clean up.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop_during_start)
    with services(settings) as urls:
        upgrade(urls.database_url)
        log.info("migrations applied")
        with runtime_file(settings, urls):
            tune_gc()
            # From here the service's own handlers take SIGTERM/SIGINT: finish the batch, then exit.
            code = asyncio.run(run_service(settings, urls))
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
    report any difference (exit 1 if something differs, 2 if verify cannot run)."""
    from projections.verify import verify_command

    raise typer.Exit(verify_command(database_url, keep=keep, wallets=wallet or (), limit=limit))


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
