"""One writer process of `billing up` (``BILLING_INTAKE_WRITERS``; consumers/service/writers.py):
``python -m consumers.service.writer_process --parent-pid P --index I``, started by the parent only.

It dies with its parent (``PR_SET_PDEATHSIG``), reads its settings from the environment the parent
gave it (the service's database and NATS URLs already resolved), and runs ``run_service`` in writer
mode: the intake of the units it owns, a relay and a scheduler; no HTTP, no admission, no embedded
server. It prints ``READY_LINE`` on stdout once it has joined the ownership. SIGTERM or SIGINT stops
it as they stop an instance (the batch in hand is finished, committed and acked, its units released).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from typing import Final

from consumers.runtime.gc_tuning import tune_gc
from consumers.runtime.instance import ServiceUrls
from consumers.runtime.preflight import load_settings
from consumers.runtime.user_errors import UserError
from consumers.service.run import run_service
from consumers.service.writers import READY_LINE, USAGE_EXIT

log = logging.getLogger("billing")

PR_SET_PDEATHSIG: Final = 1
# Without prctl (not Linux): how often a thread checks that the parent is still there.
PARENT_POLL_S: Final = 0.5


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel SIGKILL this process when its parent dies; False if the parent is already gone
    (it died before the prctl: this process was re-parented)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(PARENT_POLL_S)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="billing-parent-watch", daemon=True).start()
    return os.getppid() == parent_pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'writer_process'}")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s [writer {args.index}]: %(message)s"
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    if not die_with_parent(args.parent_pid):
        log.warning("the parent (pid %d) is gone: not starting", args.parent_pid)
        return 0
    try:
        settings = load_settings()
        if not settings.database_url or not settings.nats_url:
            raise UserError("a writer process needs BILLING_DATABASE_URL and BILLING_NATS_URL (its parent sets them)")
    except UserError as exc:
        log.error("%s", exc)
        return USAGE_EXIT
    urls = ServiceUrls(database_url=settings.database_url, nats_url=settings.nats_url, embedded=())

    def ready() -> None:
        print(READY_LINE, flush=True)

    tune_gc()
    try:
        return asyncio.run(
            run_service(settings, urls, on_ready=ready, connect_timeout_s=settings.connect_timeout_s, writer=True)
        )
    except UserError as exc:
        log.error("%s", exc)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
