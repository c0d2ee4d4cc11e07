"""The rate-limit storage against the real Redis: a request's two windows in one round
trip, with the counters, TTLs, decisions and headers flask-limiter's own loop gives."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from limits import parse_many

from tests import support


@dataclasses.dataclass
class Limited:
    app: Flask
    client: FlaskClient
    headers: dict[str, str]
    user: str
    commands: list[str]  # what the limiter's storage sent to Redis

    def keys(self, limit: str) -> list[str]:
        """The Redis keys of the read limit's windows, as flask-limiter names them."""
        from api.extensions import limiter

        storage: Any = limiter.storage
        return [
            storage.prefixed_key(item.key_for("spool-rl", f"user:{self.user}", "read"))
            for item in sorted(parse_many(limit))
        ]

    def read(self) -> Any:
        return self.client.get("/v1/jobs", headers=self.headers)

    def reads(self, n: int) -> tuple[list[int], list[str], list[str], Any]:
        """n reads: their statuses, X-RateLimit-Remaining and -Limit, and the last one."""
        rs = [self.read() for _ in range(n)]
        return (
            [r.status_code for r in rs],
            [r.headers["X-RateLimit-Remaining"] for r in rs],
            [r.headers["X-RateLimit-Limit"] for r in rs],
            rs[-1],
        )


def limited_app(read_limit: str, monkeypatch: pytest.MonkeyPatch) -> Limited:
    from api import create_app
    from api.extensions import limiter
    from spool import settings

    app = create_app(dataclasses.replace(settings.get(), rate_limit_read=read_limit))
    client = app.test_client()
    r = client.post("/v1/auth/token", json={"api_key": support.create_user()})
    assert r.status_code == 200, r.text
    token = r.json["access_token"]
    user = jwt.decode(token, options={"verify_signature": False})["sub"]

    limiter.storage.incr("warm-up", 1)  # loads the script: later calls are EVALSHA alone
    commands = count_commands(limiter.storage.get_connection(), monkeypatch)  # type: ignore[attr-defined]
    return Limited(app, client, {"Authorization": f"Bearer {token}"}, user, commands)


def command_names(packed: Any) -> list[str]:
    """The names of the commands in what a connection sends (RESP arrays of bulk strings,
    one or several commands, in one or more chunks)."""
    data = b"".join(packed) if isinstance(packed, list) else packed
    data = data.encode() if isinstance(data, str) else data
    names, i = [], 0
    while i < len(data):
        end = data.index(b"\r\n", i)
        n, i = int(data[i + 1 : end]), end + 2  # *<n>
        for k in range(n):
            end = data.index(b"\r\n", i)
            size, i = int(data[i + 1 : end]), end + 2  # $<size>
            if k == 0:
                names.append(data[i : i + size].decode().upper())
            i += size + 2
    return names


def count_commands(client: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every command `client`'s pool sends from now on, whichever way it is sent
    (the client's methods or a pre-packed call): at each connection's socket writes."""
    commands: list[str] = []
    pool = client.connection_pool
    real_get = pool.get_connection

    def get_connection(*args: Any, **kw: Any) -> Any:
        conn = real_get(*args, **kw)
        if getattr(conn.send_packed_command, "counts_into", None) is not commands:
            real_send = conn.send_packed_command

            def send(packed: Any, check_health: bool = True) -> None:
                commands.extend(command_names(packed))
                real_send(packed, check_health=check_health)

            send.counts_into = commands  # type: ignore[attr-defined]
            monkeypatch.setattr(conn, "send_packed_command", send)  # undone after the test
        return conn

    monkeypatch.setattr(pool, "get_connection", get_connection)
    return commands


@pytest.fixture()
def redis(database_url: str, redis_client: Any) -> Iterator[Any]:
    yield redis_client


def test_one_round_trip_for_both_windows(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lim = limited_app("3/second;5/minute", monkeypatch)
    second, minute = lim.keys("3/second;5/minute")

    r = lim.read()
    assert r.status_code == 200, r.text
    # One EVALSHA increments both windows; the headers need no GET or TTL after it.
    assert lim.commands == ["EVALSHA"]
    assert redis.get(second) == "1" and redis.get(minute) == "1"
    assert 0 < redis.pttl(second) <= 1000
    assert 58_000 < redis.pttl(minute) <= 60_000
    assert r.headers["X-RateLimit-Limit"] == "3"
    assert r.headers["X-RateLimit-Remaining"] == "2"

    r = lim.read()
    assert r.status_code == 200, r.text
    assert lim.commands == ["EVALSHA", "EVALSHA"]
    assert redis.get(minute) == "2"
    assert 58_000 < redis.pttl(minute) <= 60_000  # set once, when the window began


def test_breach_of_the_first_window_does_not_count_in_the_second(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = "2 per 10 seconds;100/minute"
    lim = limited_app(limit, monkeypatch)
    first, minute = lim.keys(limit)

    statuses, remaining, _limits, r = lim.reads(4)
    assert statuses == [200, 200, 429, 429]
    assert remaining == ["1", "0", "0", "0"]
    assert r.headers["X-RateLimit-Limit"] == "2"
    # As in flask-limiter's own loop: the rejected requests stop at the first window.
    assert redis.get(first) == "4"
    assert redis.get(minute) == "2"
    assert lim.commands == ["EVALSHA"] * 4


def test_breach_of_the_second_window(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = "10 per 10 seconds;3/minute"
    lim = limited_app(limit, monkeypatch)
    first, minute = lim.keys(limit)

    statuses, remaining, limits, _last = lim.reads(5)
    assert statuses == [200, 200, 200, 429, 429]
    # The first window's headers while both pass; the breached window's after.
    assert limits == ["10", "10", "10", "3", "3"]
    assert remaining == ["9", "8", "7", "0", "0"]
    assert redis.get(first) == "5" and redis.get(minute) == "5"
    assert lim.commands == ["EVALSHA"] * 5


def test_storage_alone_counts_one_window_per_call(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """limits' interface (`incr`) still works on this storage: one window, one script."""
    from api.extensions import limiter

    limit = "3/second;5/minute"
    lim = limited_app(limit, monkeypatch)
    storage: Any = limiter.storage
    k1, k2 = (i.key_for("spool-rl", f"user:{lim.user}", "other") for i in sorted(parse_many(limit)))
    assert storage.incr(k1, 1) == 1
    assert redis.get(storage.prefixed_key(k2)) is None  # a group only from api/ratelimit
    assert storage.incr(k2, 60) == 1
    assert storage.incr(k2, 60) == 2
    assert lim.commands == ["EVALSHA"] * 3
    assert storage.get(k2) == 2 and 58 < storage.get_expiry(k2) - time.time() <= 60


def test_headers_of_a_view_that_sets_retry_after(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 202 from /result carries its poll interval in Retry-After; the limit's headers
    join it, keeping the later of the two (as flask-limiter's did)."""
    lim = limited_app("5/second;100/minute", monkeypatch)
    r = lim.client.post(
        "/v1/jobs", json={"kind": "echo", "model": "echo", "input": {}}, headers=lim.headers
    )
    assert r.status_code == 202, r.text
    r = lim.client.get(f"/result/{r.json['id']}", headers=lim.headers)
    assert r.status_code == 202  # no worker here: still queued
    assert r.headers["X-RateLimit-Limit"] == "5" and r.headers["X-RateLimit-Remaining"] == "4"
    assert int(r.headers["Retry-After"]) >= 1
    assert int(r.headers["X-RateLimit-Reset"]) - time.time() <= 2
    assert lim.client.get("/healthz").headers.get("X-RateLimit-Limit") is None


def test_a_repeated_window_counts_once(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    lim = limited_app("2/second;2/second;100/minute", monkeypatch)
    second, minute = lim.keys("2/second;100/minute")
    statuses, remaining, _, _ = lim.reads(3)
    assert statuses == [200, 200, 429] and remaining == ["1", "0", "0"]
    assert redis.get(second) == "3" and redis.get(minute) == "2"


def test_a_limit_that_does_not_parse_stops_the_app(database_url: str) -> None:
    from api import create_app
    from spool import settings
    from spool.settings import ConfigError

    bad = dataclasses.replace(settings.get(), rate_limit_read="lots per second")
    with pytest.raises(ConfigError, match="SPOOL_RATE_LIMIT_READ='lots per second'"):
        create_app(bad)


def test_only_limited_views_ask_the_limiter(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No pass over every request, and no per-request resolution of the view's limits:
    /healthz costs the limiter nothing, and a limited view is counted by its decorator
    alone, in one round trip."""
    from flask_limiter import Limiter

    calls: list[str | None] = []

    def spy(self: Limiter, callable_name: str | None = None, in_middleware: bool = True) -> None:
        calls.append(callable_name)

    monkeypatch.setattr(Limiter, "_check_request_limit", spy)
    lim = limited_app("2/second;100/minute", monkeypatch)
    assert lim.client.get("/healthz").status_code == 200
    assert lim.commands == []
    statuses, remaining, _, last = lim.reads(3)
    assert statuses == [200, 200, 429] and remaining == ["1", "0", "0"]
    assert last.json["error"]["code"] == "rate_limited"
    assert last.json["error"]["message"] == "rate limit exceeded: 2 per 1 second"
    assert 0 <= int(last.headers["Retry-After"]) <= 1
    assert lim.commands == ["EVALSHA"] * 3
    assert calls == []  # flask-limiter's own resolution never ran


def test_flask_limiters_request_hooks_are_gone(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from api.extensions import limiter

    lim = limited_app("5/second;100/minute", monkeypatch)
    app = lim.app
    for hooks in (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs):
        for f in hooks.get(None, []):
            assert getattr(f, "__self__", None) is not limiter
            assert not (isinstance(f, functools.partial) and limiter in f.args)
    assert len(app.after_request_funcs[None]) >= 3  # Spool's own are still there


def test_another_storage_counts_through_limits_strategy(database_url: str) -> None:
    """A storage other than Spool's Redis one (memory:// here, or any other `limits`
    storage the RATELIMIT_STORAGE_URI names) is counted window by window through
    limits' strategy: same decisions and headers."""
    from api import create_app
    from api.extensions import limiter
    from spool import settings

    app = create_app(dataclasses.replace(settings.get(), rate_limit_read="2/second;100/minute"))
    app.config["RATELIMIT_STORAGE_URI"] = "memory://"
    limiter.init_app(app)  # as create_app would with that URI
    try:
        assert type(limiter.storage).__name__ == "MemoryStorage"
        client = app.test_client()
        r = client.post("/v1/auth/token", json={"api_key": support.create_user()})
        headers = {"Authorization": f"Bearer {r.json['access_token']}"}
        rs = [client.get("/v1/jobs", headers=headers) for _ in range(3)]
        assert [r.status_code for r in rs] == [200, 200, 429]
        assert [r.headers["X-RateLimit-Remaining"] for r in rs] == ["1", "0", "0"]
        assert {r.headers["X-RateLimit-Limit"] for r in rs} == {"2"}
        assert 0 <= int(rs[-1].headers["Retry-After"]) <= 1
    finally:
        create_app(settings.get())  # the limiter (one per process) back on Redis


def test_a_flushed_script_is_loaded_again(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit's call is packed once per user and sent as is; after Redis lost its
    scripts (a restart, SCRIPT FLUSH) the NOSCRIPT answer sends it through the script's
    own call, which loads it again: the request is counted once, and limited."""
    lim = limited_app("2/second;100/minute", monkeypatch)
    second, minute = lim.keys("2/second;100/minute")
    assert lim.read().status_code == 200
    redis.script_flush()
    statuses, remaining, _, _ = lim.reads(2)
    assert statuses == [200, 429] and remaining == ["0", "0"]
    assert redis.get(second) == "3" and redis.get(minute) == "2"
    # the packed EVALSHA, NOSCRIPT, the script's own EVALSHA, NOSCRIPT, its SCRIPT LOAD
    # and EVALSHA; then the packed EVALSHA alone again
    assert lim.commands == ["EVALSHA"] * 3 + ["SCRIPT", "EVALSHA", "EVALSHA"]


def test_a_dropped_connection_is_not_handed_out_again(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that failed on its connection is made again through the client's own call,
    which reconnects: the request is counted once, and the pool keeps no dead socket."""
    from api.extensions import limiter

    lim = limited_app("5/second;100/minute", monkeypatch)
    second, _ = lim.keys("5/second;100/minute")
    assert lim.read().status_code == 200
    pool = limiter.storage.get_connection().connection_pool  # type: ignore[attr-defined]
    for conn in pool._available_connections:
        conn._sock.close()  # as a Redis restart leaves them: the next send fails
    r = lim.read()
    assert r.status_code == 200 and r.headers["X-RateLimit-Remaining"] == "3"
    assert redis.get(second) == "2"
    assert all(c._sock is not None and c._sock.fileno() != -1 for c in pool._available_connections)
