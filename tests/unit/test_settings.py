from __future__ import annotations

import pytest

from spool import settings


def test_defaults_serve_development(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SPOOL_ENV", "SPOOL_SECRET_KEY", "SPOOL_LEASE_S", "SPOOL_PORT"):
        monkeypatch.delenv(var, raising=False)
    s = settings.from_env()
    assert s.env == "development" and s.port == 8000 and s.lease_s == 30
    assert s.heartbeat_interval == pytest.approx(10)


def test_production_refuses_default_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOOL_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("REDIS_URL", "redis://r/0")
    monkeypatch.delenv("SPOOL_SECRET_KEY", raising=False)
    with pytest.raises(settings.ConfigError, match="SPOOL_SECRET_KEY"):
        settings.from_env()
    monkeypatch.setenv("SPOOL_SECRET_KEY", "short")
    with pytest.raises(settings.ConfigError):
        settings.from_env()
    monkeypatch.setenv("SPOOL_SECRET_KEY", "x" * 40)
    assert settings.from_env().production


def test_production_requires_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOOL_ENV", "production")
    monkeypatch.setenv("SPOOL_SECRET_KEY", "x" * 40)
    monkeypatch.setenv("DATABASE_URL", "")
    with pytest.raises(settings.ConfigError, match="DATABASE_URL"):
        settings.from_env()


def test_bad_numbers_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOOL_PORT", "eighty")
    with pytest.raises(settings.ConfigError, match="SPOOL_PORT"):
        settings.from_env()
    monkeypatch.setenv("SPOOL_PORT", "8000")
    monkeypatch.setenv("SPOOL_LEASE_S", "0.5")
    with pytest.raises(settings.ConfigError, match="SPOOL_LEASE_S"):
        settings.from_env()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("yes", True), ("ON", True), ("0", False), ("", False), (None, False)],
)
def test_parse_bool(raw: str | None, expected: bool) -> None:
    assert settings.parse_bool(raw) is expected
