"""Invariant checks that hold even under ``python -O``.

``assert`` statements vanish under ``-O``; money invariants must not. Every check here raises
:class:`InvariantViolation`, which callers must treat as a bug: the unit of work rolls back and the
batch is redelivered rather than committing a ledger that is wrong.
"""

from __future__ import annotations

from typing import NoReturn


class InvariantViolation(AssertionError):
    """A broken invariant: a bug, never bad input. Bad input gets a typed rejection instead."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`InvariantViolation` with ``message`` unless ``condition`` holds.

    Use for facts that must be true whatever the input; validate input elsewhere.
    """
    if not condition:
        fail(message)


def fail(message: str) -> NoReturn:
    raise InvariantViolation(message)


def require_int(value: object, name: str) -> int:
    """Money and counters are plain ``int`` (``bool`` is an ``int`` subclass and is refused)."""
    if type(value) is not int:
        fail(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    return value
