"""A platform for webhook and batch tests: its own database and Redis, private webhook
addresses allowed (the receiver is on loopback) and retry delays scaled down 100x."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests import support
from tests.webhook_receiver import Receiver

HOOKS_ENV = {"SPOOL_WEBHOOK_ALLOW_PRIVATE": "1", "SPOOL_WEBHOOK_RETRY_SCALE": "0.01"}


@pytest.fixture(scope="session")
def hooks_platform(
    services: support.Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[support.IsolatedPlatform]:
    p = support.IsolatedPlatform(services, tmp_path_factory.mktemp("hooks"), HOOKS_ENV)
    try:
        p.start_api()
        p.start_worker("echo", queues="spool.cpu")  # echo jobs, and webhooks on spool.cpu
        p.start_beat()
        yield p
    finally:
        p.close()


def new_user(p: support.Platform, name: str | None = None) -> str:
    """A user in the platform's database, made in-process (no CLI start-up); its API key."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from spool import users
    from spool.db import normalize_url

    eng = create_engine(normalize_url(p.database_url), poolclass=NullPool)
    try:
        with Session(eng) as s, s.begin():
            _, key = users.create_user(s, name or f"u_{uuid.uuid4().hex[:8]}")
        return key
    finally:
        eng.dispose()


@pytest.fixture()
def hooks_api(hooks_platform: support.IsolatedPlatform) -> support.Api:
    return support.Api(hooks_platform.url, new_user(hooks_platform))


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


STRICT_ENV = {"SPOOL_WEBHOOK_ALLOW_PRIVATE": "0", "SPOOL_MAX_QUEUED_PER_USER": "50"}


@pytest.fixture(scope="session")
def strict_api_url(
    hooks_platform: support.IsolatedPlatform, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An API process alone on the same database and Redis, configured as in production
    (no private webhook addresses) and with a small per-user cap on queued jobs."""
    p = support.Platform(
        hooks_platform.database_url,
        hooks_platform.redis_url,
        tmp_path_factory.mktemp("strict"),
        STRICT_ENV,
    )
    try:
        p.start_api()
        yield p.url
    finally:
        p.stop()
