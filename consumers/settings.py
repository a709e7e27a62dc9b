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

    # --- JetStream intake (consumers/intake.py) ------------------------------------------------------
    intake_durable: str = Field(default="billing-intake", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Messages per database transaction (the processor takes at most 5,000).
    intake_batch_size: int = Field(default=1000, ge=1, le=5000)
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
    # Partitions of billing.in (DESIGN section 8, consumers/partitions.py). 0: one durable consumer on
    # billing.in.> with subjects billing.in.<walletId> (single node, embedded server, tests). N > 0:
    # the NATS mapping stores billing.in.<p>.<walletId>; one durable per partition, each pulled by
    # exactly one instance at a time (a PostgreSQL advisory lock). N must equal the mapping's N.
    intake_partitions: int = Field(default=0, ge=0, le=256)
    # Partitioned: how often an instance checks its locks, counts the live instances and takes or
    # gives up partitions (a dead instance's partitions move within about this long).
    intake_rebalance_s: float = Field(default=2.0, gt=0, le=60)


def nats_servers(url: str) -> list[str]:
    """The server URLs of ``BILLING_NATS_URL``: one, or several separated by commas (a cluster).

    nats-py refuses the comma-separated string itself ("invalid connect url option")."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError("BILLING_NATS_URL names no server")
    return servers
