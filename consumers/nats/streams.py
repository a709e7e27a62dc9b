"""The JetStream streams of the contract (DESIGN sections 3 and 5), declared idempotently at start.

| stream             | subjects                  | written by                      |
|--------------------|---------------------------|---------------------------------|
| ``BILLING_IN``       | ``billing.in.>``            | the compute plane (usage facts) |
| ``BILLING_DLQ``      | ``billing.dlq.>``           | the intake (dead letters)       |
| ``COMPUTE_COMMANDS`` | ``compute.commands.stop``   | the outbox relay                |
| ``BILLING_OUT``      | ``billing.out.>``           | the outbox relay                |

All are file-backed with a 120 s duplicate window (every publisher sets ``Nats-Msg-Id``) and
``settings.nats_replicas`` replicas. Names and subjects come from :class:`NatsNames`, so a test run
or a staging copy with a namespace gets its own streams.

A stream that exists is **updated, never deleted or recreated**: only the fields this service owns
(subjects, duplicate window, replicas) are changed, and whatever an operator set beside them (limits,
max age, placement) is kept. The storage type of an existing stream cannot change in JetStream; a
mismatch is logged, not "fixed" by a delete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from consumers.nats.names import NatsNames

log = logging.getLogger("billing.streams")

DUPLICATE_WINDOW_S: Final = 120.0
"""How long JetStream remembers a ``Nats-Msg-Id``: a producer's retry within it is dropped."""

STREAM_NAME_IN_USE: Final = 10058
"""JetStream API error code: a stream of that name exists (with another configuration)."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str


def stream_specs(names: NatsNames) -> list[StreamSpec]:
    return [
        StreamSpec(names.in_stream, (names.in_subjects,), "Usage facts in: CloudEvents per wallet (docs/events.md)"),
        StreamSpec(names.dlq_stream, (names.dlq_subjects,), "Dead letters: refused inputs with their reason"),
        StreamSpec(names.commands_stream, (names.stop_subject,), "Stop commands to the compute plane (docs/events.md)"),
        StreamSpec(names.out_stream, (names.out_subjects,), "Notices and settlements out (docs/events.md)"),
    ]


def _config(spec: StreamSpec, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


async def ensure_streams(js: JetStreamContext, names: NatsNames, *, replicas: int) -> list[str]:
    """Create the contract's streams, or bring existing ones up to date; return their names."""
    declared = []
    for spec in stream_specs(names):
        await ensure_stream(js, spec, replicas=replicas)
        declared.append(spec.name)
    return declared


async def ensure_stream(js: JetStreamContext, spec: StreamSpec, *, replicas: int) -> None:
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        try:
            await js.add_stream(_config(spec, replicas))
        except BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            info = await js.stream_info(spec.name)  # another instance created it meanwhile: update
        else:
            log.info("stream %s created (subjects %s, %d replica(s))", spec.name, ", ".join(spec.subjects), replicas)
            return
    current = info.config
    if current.storage is not None and current.storage != StorageType.FILE:
        log.warning(
            "stream %s uses %s storage, not file; JetStream cannot change it in place: recreate it by hand "
            "(this service never deletes a stream)",
            spec.name,
            current.storage,
        )
    if (
        sorted(current.subjects or []) == sorted(spec.subjects)
        and current.duplicate_window == DUPLICATE_WINDOW_S
        and (current.num_replicas or 1) == replicas
    ):
        return
    updated = current.evolve(
        subjects=list(spec.subjects),
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )
    await js.update_stream(updated)
    log.info("stream %s updated (subjects %s, %d replica(s))", spec.name, ", ".join(spec.subjects), replicas)
