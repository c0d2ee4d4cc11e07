"""Settings from the environment, in one typed object (12-factor).

Every variable is listed in the README. Defaults serve development; production
mode refuses to start with a default secret.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

DEV_SECRET = "dev-insecure-secret-change-me-0123456789abcdef"


class ConfigError(RuntimeError):
    """A setting is missing or invalid; raised at start-up, never mid-request."""


def parse_bool(value: str | None, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    env: str = "development"
    database_url: str = ""
    redis_url: str = ""
    secret_key: str = DEV_SECRET
    var_dir: Path = field(default_factory=lambda: Path("var"))
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""
    api_workers: int = 2
    api_worker_connections: int = 1000
    worker_concurrency: int = 0  # 0 = auto: enough slots to fill the largest micro-batch
    token_ttl_s: int = 3600
    rate_limit_submit: str = "50/second;2000/minute"
    rate_limit_read: str = "200/second;20000/minute"
    max_queued_per_user: int = 100_000
    max_body_bytes: int = 64 * 1024 * 1024
    lease_s: float = 30.0
    heartbeat_s: float = 0.0  # 0 = lease_s / 3
    max_attempts: int = 3
    sweep_interval_s: float = 5.0
    resend_grace_s: float = 10.0
    default_timeout_s: int = 3600
    max_timeout_s: int = 24 * 3600
    result_retention_s: int = 7 * 24 * 3600
    log_level: str = "INFO"
    log_format: str = "console"
    models_file: str = ""
    artifacts_url: str = ""
    webhook_allow_private: bool = False
    webhook_retry_scale: float = 1.0  # multiplies every webhook retry delay (tests: 0.01)
    webhook_timeout_s: float = 15.0
    torch_threads: int = 0
    metrics_port: int = 9750
    gpus: str = "auto"  # `spool worker`: a process per GPU (spool/gpus.py)
    # Connections a pool keeps open. Overflow connections are closed as soon as they are
    # returned, so under load they are opened and closed again and again (a PostgreSQL
    # backend start costs milliseconds of CPU): the default keeps them all.
    db_pool_size: int = 10
    # Hot statements as PREPARE/EXECUTE, once per connection (spool/db.py). Off behind a
    # transaction-pooling proxy (PgBouncer), where a session's statements do not follow it.
    db_prepare: bool = True
    db_max_overflow: int = 0

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_s or self.lease_s / 3

    @property
    def base_url(self) -> str:
        return self.public_url.rstrip("/")

    def validate(self) -> Settings:
        if self.production:
            if self.secret_key == DEV_SECRET or len(self.secret_key) < 32:
                raise ConfigError(
                    "SPOOL_SECRET_KEY must be set to a random string of 32+ characters "
                    "in production (SPOOL_ENV=production)"
                )
            if not self.database_url or not self.redis_url:
                raise ConfigError("DATABASE_URL and REDIS_URL are required in production")
        if self.lease_s <= 1:
            raise ConfigError("SPOOL_LEASE_S must be greater than 1 second")
        if self.max_attempts < 1:
            raise ConfigError("SPOOL_MAX_ATTEMPTS must be at least 1")
        if not 0 < self.webhook_retry_scale <= 1000:
            raise ConfigError("SPOOL_WEBHOOK_RETRY_SCALE must be above 0 (1 = as specified)")
        if self.webhook_timeout_s <= 0:
            raise ConfigError("SPOOL_WEBHOOK_TIMEOUT_S must be greater than 0")
        return self


def from_env() -> Settings:
    """Read every setting from the environment (not cached: tests build their own)."""
    var_dir = Path(_env("SPOOL_VAR_DIR", "var")).resolve()
    return Settings(
        env=_env("SPOOL_ENV", "development"),
        database_url=_env("DATABASE_URL", ""),
        redis_url=_env("REDIS_URL", ""),
        secret_key=_env("SPOOL_SECRET_KEY", DEV_SECRET),
        var_dir=var_dir,
        host=_env("SPOOL_HOST", "127.0.0.1"),
        port=_int("SPOOL_PORT", 8000),
        public_url=_env("SPOOL_PUBLIC_URL", ""),
        api_workers=_int("SPOOL_API_WORKERS", 2),
        api_worker_connections=_int("SPOOL_API_WORKER_CONNECTIONS", 1000),
        worker_concurrency=_int("SPOOL_WORKER_CONCURRENCY", 0),
        token_ttl_s=_int("SPOOL_TOKEN_TTL_S", 3600),
        rate_limit_submit=_env("SPOOL_RATE_LIMIT_SUBMIT", "50/second;2000/minute"),
        rate_limit_read=_env("SPOOL_RATE_LIMIT_READ", "200/second;20000/minute"),
        max_queued_per_user=_int("SPOOL_MAX_QUEUED_PER_USER", 100_000),
        max_body_bytes=_int("SPOOL_MAX_BODY_BYTES", 64 * 1024 * 1024),
        lease_s=_float("SPOOL_LEASE_S", 30.0),
        heartbeat_s=_float("SPOOL_HEARTBEAT_S", 0.0),
        max_attempts=_int("SPOOL_MAX_ATTEMPTS", 3),
        sweep_interval_s=_float("SPOOL_SWEEP_INTERVAL_S", 5.0),
        resend_grace_s=_float("SPOOL_RESEND_GRACE_S", 10.0),
        default_timeout_s=_int("SPOOL_DEFAULT_TIMEOUT_S", 3600),
        max_timeout_s=_int("SPOOL_MAX_TIMEOUT_S", 24 * 3600),
        result_retention_s=_int("SPOOL_RESULT_RETENTION_S", 7 * 24 * 3600),
        log_level=_env("SPOOL_LOG_LEVEL", "INFO").upper(),
        log_format=_env(
            "SPOOL_LOG_FORMAT", "json" if _env("SPOOL_ENV", "") == "production" else "console"
        ),
        models_file=_env("SPOOL_MODELS_FILE", ""),
        artifacts_url=_env("SPOOL_ARTIFACTS_URL", str(var_dir / "artifacts")),
        webhook_allow_private=parse_bool(os.environ.get("SPOOL_WEBHOOK_ALLOW_PRIVATE")),
        webhook_retry_scale=_float("SPOOL_WEBHOOK_RETRY_SCALE", 1.0),
        webhook_timeout_s=_float("SPOOL_WEBHOOK_TIMEOUT_S", 15.0),
        torch_threads=_int("SPOOL_TORCH_THREADS", 0),
        metrics_port=_int("SPOOL_METRICS_PORT", 9750),
        gpus=_env("SPOOL_GPUS", "auto"),
        db_pool_size=_int("SPOOL_DB_POOL_SIZE", 10),
        db_prepare=parse_bool(os.environ.get("SPOOL_DB_PREPARE"), True),
        db_max_overflow=_int("SPOOL_DB_MAX_OVERFLOW", 0),
    ).validate()


@lru_cache(maxsize=1)
def get() -> Settings:
    """The process-wide settings, read once."""
    return from_env()


def names() -> list[str]:
    return [f.name for f in fields(Settings)]
