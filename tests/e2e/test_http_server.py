"""The API's HTTP server (api/gunicorn_worker.py) over raw sockets, as `spool up` runs it:
keep-alive connections rotate after SPOOL_API_KEEPALIVE_REQUESTS requests (20 by
default) and close after gunicorn's `keepalive` seconds (5) idle."""

from __future__ import annotations

import socket
import time

from tests import support


def _connect(platform: support.Platform) -> socket.socket:
    port = int(platform.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    return sock


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: spool\r\n\r\n"


def _exchange(
    sock: socket.socket, buf: bytearray, request: bytes = HEALTHZ
) -> tuple[int, dict[str, str], bytes]:
    """A request on a kept-alive connection; the answer's status, headers and body."""
    sock.sendall(request)
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection before answering"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    size = int(headers["content-length"])
    while len(rest) < size:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    del buf[:]
    buf += rest[size:]
    return int(lines[0].split()[1]), headers, rest[:size]


def test_a_keep_alive_connection_closes_after_twenty_requests(platform: support.Platform) -> None:
    with _connect(platform) as sock:
        buf = bytearray()
        answers = [_exchange(sock, buf) for _ in range(20)]
        assert [status for status, _, _ in answers] == [200] * 20
        closing = [h.get("connection", "").lower() == "close" for _, h, _ in answers]
        assert closing == [False] * 19 + [True]
        assert sock.recv(1) == b""  # closed by the server after the 20th


def test_an_idle_keep_alive_connection_is_closed(platform: support.Platform) -> None:
    with _connect(platform) as sock:
        status, headers, _ = _exchange(sock, bytearray())
        assert status == 200 and headers.get("connection", "").lower() != "close"
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # no second request: the server hangs up
        assert 4.0 <= time.monotonic() - t0 < 10.0


def test_a_request_line_too_long_is_refused(platform: support.Platform) -> None:
    with _connect(platform) as sock:
        sock.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: spool\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"414"


def test_a_chunked_body_read_to_its_end_keeps_the_connection(platform: support.Platform) -> None:
    """A chunked POST the API reads whole is answered on a connection that stays open."""
    body = b'{"api_key": "sk_nothing"}'
    request = (
        b"POST /v1/auth/token HTTP/1.1\r\nHost: spool\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body
        + b"\r\n0\r\n\r\n"
    )  # fmt: skip
    with _connect(platform) as sock:
        buf = bytearray()
        status, headers, _ = _exchange(sock, buf, request)
        assert status == 401 and headers.get("connection", "").lower() != "close"
        status, _, _ = _exchange(sock, buf)  # the same connection serves the next one
        assert status == 200
