"""Configuration by environment (DESIGN section 7). Nothing else reads os.environ for settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BILLING_", extra="ignore")

    # Unset: `billing up` starts an embedded PostgreSQL (pgserver) in data_dir.
    database_url: str | None = None
    # The role the service runs as (SET ROLE on every connection): INSERT/SELECT on the log and the
    # journal, nothing that could change history. Empty disables (only for a login that already is it).
    database_role: str = "billing_app"
    # Unset: `billing up` starts an embedded nats-server with JetStream in data_dir. A cluster: the
    # servers separated by commas (nats://u:p@nats-1:4222,nats://u:p@nats-2:4222,...), see nats_servers().
    nats_url: str | None = None
    # Prefix of every subject and stream; empty in production (the contract's names exactly).
    nats_namespace: str = ""
    # JetStream storage and replicas of the streams the service declares (3 on a cluster).
    nats_replicas: int = Field(default=1, ge=1, le=5)
    http_port: int = Field(default=8080, ge=0, le=65535)
    api_tokens: SecretStr = SecretStr("")
    stripe_api_key: SecretStr = SecretStr("")
    stripe_webhook_secret: SecretStr = SecretStr("")
    stripe_api_base: str | None = None
    data_dir: Path = Path(".billing")
    max_topup_micros: int = Field(default=10_000_000_000, gt=0)

    # --- `billing up`: HTTP and shutdown -----------------------------------------------------------
    http_host: str = "0.0.0.0"  # noqa: S104 - the service's port is meant to be reachable (probes, metrics)
    # SIGTERM: the batch in hand is finished, committed and acked; whatever still runs after this is
    # cancelled (its messages are redelivered) and the process exits.
    shutdown_timeout_s: float = Field(default=20.0, gt=0, le=600)

    # --- JetStream intake (consumers/nats/intake.py) ------------------------------------------------------
    intake_durable: str = Field(default="billing-intake", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Messages per pull and per batch at most (the processor takes at most 5,000 a transaction).
    # Under load a batch is as full as this; when quiet, a pull takes what is there (small batches,
    # low latency). A batch is one transaction; a larger one costs less per message (one pull, one
    # settling, each of its wallets locked and saved once). 4,000 drained fastest of 1,000-4,000 without a longer
    # zero -> stop tail (figures in bench/README.md).
    intake_batch_size: int = Field(default=4000, ge=1, le=5000)
    # When idle, how long one pull request waits for the next message before it is renewed.
    intake_max_wait_s: float = Field(default=1.0, gt=0, le=30)
    # Unacked this long, a message is redelivered; a batch that runs long sends in-progress acks.
    intake_ack_wait_s: float = Field(default=30.0, ge=1, le=3600)
    # Deliveries of one message; the last delivery of a reading whose rental has not started is
    # dead-lettered as not_started instead of retried again.
    intake_max_deliver: int = Field(default=20, ge=2, le=10_000)
    # Delivered but unacked messages the server allows (in hand, prefetched, and delayed retries).
    intake_max_ack_pending: int = Field(default=20_000, ge=2, le=1_000_000)
    # Retry delay of a not-started reading: this, doubled per delivery, at most the max.
    intake_nak_delay_s: float = Field(default=1.0, ge=0, le=3600)
    intake_nak_delay_max_s: float = Field(default=60.0, ge=0, le=3600)
    # Back-off between attempts at a batch whose transaction failed (database down): doubling, capped.
    intake_db_retry_max_s: float = Field(default=5.0, gt=0, le=300)
    # Partitions of billing.in (DESIGN section 8, consumers/nats/partitions.py). 0: one durable consumer on
    # billing.in.> with subjects billing.in.<walletId> (single node, embedded server, tests), pulled by
    # one instance at a time while the others stand by. N > 0: the NATS mapping stores
    # billing.in.<p>.<walletId>; one durable per partition, each pulled by exactly one instance at a
    # time. Either way the owner is whoever holds the durable's PostgreSQL advisory lock. N must equal
    # the mapping's N.
    intake_partitions: int = Field(default=0, ge=0, le=256)
    # How often an instance checks its locks, counts the live instances and takes or gives up durables
    # (a dead instance's durables move within about this long; after an unclean loss the new owner
    # has the server requeue the dead one's un-acked messages before it pulls, so they come first:
    # consumers/nats/partitions.py).
    intake_rebalance_s: float = Field(default=2.0, gt=0, le=60)
    # Wallet states the owner of an intake consumer keeps in memory (projections.wallet_store.WalletCache:
    # least recently used dropped beyond it; a few KB each). Each owned partition has its own.
    intake_cache_wallets: int = Field(default=50_000, ge=5_000, le=10_000_000)
    # Processes of one `billing up` that own partitions (consumers/service/writers.py): the instance
    # itself and W-1 writer processes beside it, each a member of the ownership like an instance (so
    # the fair share spreads the partitions over every process of every instance), each running its
    # own intake, relay and scheduler (no HTTP, no admission). One interpreter is bound by its GIL;
    # W > 1 lets one instance use more cores. Only with BILLING_INTAKE_PARTITIONS >= 2 (unpartitioned
    # there is one unit: `billing up` warns and runs 1).
    intake_writers: int = Field(default=1, ge=1, le=16)

    # --- `billing up`: start-up and the embedded servers (consumers/service/up.py) ---------------------------
    # The first connect to PostgreSQL and to NATS is retried (a log line per attempt) for this long,
    # then `billing up` exits 2 naming the setting. After the start, reconnects go on for ever.
    connect_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # The embedded nats-server's client port: fixed, so producers and asyncapi.json can name it; if
    # it is taken, a free port is used instead (logged, and written to runtime.json).
    embedded_nats_port: int = Field(default=14222, ge=1, le=65535)

    # --- HTTP: bounds on slow and hostile clients (consumers/http/limits.py) ----------------------------
    # The request line and headers must arrive within this of their first byte (or of the connect);
    # the body within http_body_timeout_s of the headers. Absolute deadlines: a trickle of bytes
    # (slowloris) does not extend them. On expiry the connection is closed (408 if nothing was answered).
    http_header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    http_body_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # An idle keep-alive connection is closed after this (whole seconds, at least 1).
    http_keepalive_timeout_s: float = Field(default=5.0, ge=1, le=300)
    # Connections (and requests in flight) at once; a request past it is answered 503 at once.
    http_max_connections: int = Field(default=512, ge=1, le=100_000)
    # Largest request body of every route but the Stripe webhook (1 MiB, stripe_facts.MAX_WEBHOOK_BYTES):
    # 413 from the Content-Length, or as soon as a chunked body passes it. API bodies are < 1 KiB.
    http_max_body_bytes: int = Field(default=65_536, ge=1024, le=16_777_216)

    # --- intake: hostile input (helper "intake", issue 13) ---------------------------------------------
    # Lower bound on an event's time: older than this (default 7 days) is refused as too_old and
    # dead-lettered; `billing dlq replay --accept-old` lets such a dead letter in on purpose.
    event_max_age_s: float = Field(default=604_800.0, gt=0, le=100 * 365 * 86_400)


def nats_servers(url: str) -> list[str]:
    """The server URLs of ``BILLING_NATS_URL``: one, or several separated by commas (a cluster).

    nats-py refuses the comma-separated string itself ("invalid connect url option")."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError("BILLING_NATS_URL names no server")
    return servers
