"""Expected mistakes of the people who run the service, as one line that says what to fix.

Every CLI command and ``billing up`` raise :class:`UserError` for a mistake a person can mend (a
wrong URL, a port in use, a bad flag value); ``consumers.cli.main`` prints it as one line on
stderr and exits 2. Anything else is a bug: one line too, with the traceback only behind
``--debug`` or ``BILLING_DEBUG=1``.
"""

from __future__ import annotations

from typing import Final

# Exit status of an expected mistake (the same as a usage error of the command line).
USER_ERROR_EXIT: Final = 2
# Exit status of an unexpected failure (a bug, or a server that failed in a way we did not foresee).
INTERNAL_ERROR_EXIT: Final = 1


class UserError(Exception):
    """A mistake a person can fix; ``str(exc)`` is the one line to print (name the setting or flag)."""

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)
