"""Redis client factory: short timeouts so a dead Redis fails fast instead of hanging."""

from __future__ import annotations

from collections.abc import Callable
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


# A command as bytes, packed once by `packer` and sent as often as wanted by `send_packed`.
Packed = list[bytes]


@lru_cache(maxsize=8)
def packer(client: redis.Redis) -> Callable[..., Packed]:
    """Packs a command the way `client`'s connections do (their encoding); an unconnected
    connection object, no socket."""
    pool = client.connection_pool
    return pool.connection_class(**pool.connection_kwargs).pack_command


def send_packed(client: redis.Redis, packed: Packed, again: Callable[[], Any]) -> Any:
    """The raw reply (no response callback) of a command packed by `packer`, on a
    connection of `client`'s pool; on any Redis error, what `again()` returns.

    For a hot command the caller packs once and sends many times: what redis-py's
    `execute_command` adds around each command (packing, its retry wrapper and its
    observability hooks) cost ~30 µs of CPU of a ~90 µs call in a quiet loop
    (BENCHMARKS.md). It gives no retry of its own: after an error (the connection
    dropped, unless the server answered it) `again` makes the same call through the
    client's own method, which reconnects, retries, and loads a flushed script
    (NOSCRIPT) again. What that raises is raised."""
    pool = client.connection_pool
    try:
        conn = pool.get_connection()
    except redis.RedisError:
        return again()  # no connection to be had: the client's own call retries, or raises
    try:
        conn.send_packed_command(packed)
        return conn.read_response()
    except redis.ResponseError:
        pass  # the server's answer, read in full: the connection is fine
    except redis.RedisError:
        conn.disconnect()  # a reply may be left unread: never hand this socket out again
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    return again()


def reset() -> None:
    """Drop clients inherited across fork."""
    packer.cache_clear()  # it holds the clients it packed for
    client.cache_clear()
    _blocking.cache_clear()
    broker_client.cache_clear()
