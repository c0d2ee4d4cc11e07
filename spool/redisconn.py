"""Redis client factory: short timeouts so a dead Redis fails fast instead of hanging."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis

from spool import settings


def make_client(
    url: str,
    socket_timeout: float = 10,
    health_check_interval: float = 15,
    socket_connect_timeout: float = 2,
) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=socket_connect_timeout,
        socket_timeout=socket_timeout,
        health_check_interval=health_check_interval,
        decode_responses=True,
    )


@lru_cache(maxsize=1)
def client() -> redis.Redis:
    return make_client(settings.get().redis_url)


def blocking_client() -> redis.Redis:
    """For XREAD BLOCK: a socket timeout longer than any block we ask for."""
    return _blocking()


@lru_cache(maxsize=1)
def _blocking() -> redis.Redis:
    return make_client(settings.get().redis_url, socket_timeout=70, health_check_interval=0)


@lru_cache(maxsize=1)
def broker_client() -> redis.Redis:
    """For pushing job messages (spool.dispatch): the broker's timeouts (celery_config's
    transport options), so that a Redis that does not answer fails a submit's push as
    soon as it failed kombu's, the job then being sent by the sweeper."""
    from celery_config import broker_transport_options

    options: dict[str, Any] = broker_transport_options  # a mix of numbers and lists
    return make_client(
        settings.get().redis_url,
        socket_timeout=options["socket_timeout"],
        health_check_interval=options["health_check_interval"],
        socket_connect_timeout=options["socket_connect_timeout"],
    )


def reset() -> None:
    """Drop clients inherited across fork."""
    client.cache_clear()
    _blocking.cache_clear()
    broker_client.cache_clear()
