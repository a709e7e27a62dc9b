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
    # Unset: `billing up` starts an embedded nats-server with JetStream in data_dir.
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
