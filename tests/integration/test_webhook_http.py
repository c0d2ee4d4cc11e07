"""webhook_http.post against real HTTP(S) servers on loopback."""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from workers import webhook_http
from workers.webhook_http import DeliveryResult, next_delay, post

Respond = Callable[[BaseHTTPRequestHandler], None]


class Recorder(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, respond: Respond) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond = respond
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.sni: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.server.requests.append((self.path, dict(self.headers.items()), body))
        self.server.respond(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


def reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Respond:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


@pytest.fixture
def serve() -> Iterator[Callable[[Respond], Recorder]]:
    servers: list[Recorder] = []

    def start(respond: Respond) -> Recorder:
        server = Recorder(respond)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


BODY = b'{"type":"job.completed","data":{}}'
HEADERS = {"webhook-id": "msg_1", "content-type": "application/json"}


def test_2xx_is_success_and_request_is_as_sent(serve: Callable[[Respond], Recorder]) -> None:
    server = serve(reply(200, b"thanks"))
    result = post(server.url + "/hooks/in?x=1", BODY, HEADERS, timeout_s=5, allow_private=True)
    assert result.success and result.status_code == 200 and result.error is None
    assert result.response_excerpt == "thanks"
    assert result.duration_ms > 0
    path, headers, body = server.requests[0]
    assert path == "/hooks/in?x=1"
    assert body == BODY
    assert headers["webhook-id"] == "msg_1"
    assert headers["User-Agent"] == webhook_http.USER_AGENT
    assert headers["Host"] == f"127.0.0.1:{server.server_address[1]}"


def test_500_is_a_failure_with_its_status(serve: Callable[[Respond], Recorder]) -> None:
    server = serve(reply(500, b"boom"))
    result = post(server.url, BODY, HEADERS, timeout_s=5, allow_private=True)
    assert not result.success
    assert result.status_code == 500
    assert result.error == "HTTP 500"
    assert result.response_excerpt == "boom"


def test_retry_after_and_410(serve: Callable[[Respond], Recorder]) -> None:
    limited = serve(reply(429, headers={"Retry-After": "120"}))
    result = post(limited.url, BODY, HEADERS, timeout_s=5, allow_private=True)
    assert result.retry_after_s == 120
    gone = serve(reply(410))
    assert post(gone.url, BODY, HEADERS, timeout_s=5, allow_private=True).gone


def test_redirect_is_not_followed(serve: Callable[[Respond], Recorder]) -> None:
    target = serve(reply(200))
    redirector = serve(reply(302, headers={"Location": target.url + "/elsewhere"}))
    result = post(redirector.url, BODY, HEADERS, timeout_s=5, allow_private=True)
    assert not result.success
    assert result.status_code == 302
    assert result.error is not None and "not followed" in result.error
    assert len(redirector.requests) == 1
    assert target.requests == []


def test_hanging_server_times_out_within_the_timeout() -> None:
    # A listening socket that never accepts: the kernel completes the handshake, nobody answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        started = time.monotonic()
        result = post(url, BODY, HEADERS, timeout_s=1.0, allow_private=True)
        elapsed = time.monotonic() - started
    assert result.status_code is None
    assert result.error is not None and result.error.startswith("timeout")
    assert 0.9 <= elapsed < 2.0


def test_slow_handler_times_out(serve: Callable[[Respond], Recorder]) -> None:
    release = threading.Event()

    def hang(handler: BaseHTTPRequestHandler) -> None:
        release.wait(5)

    server = serve(hang)
    started = time.monotonic()
    result = post(server.url, BODY, HEADERS, timeout_s=1.0, allow_private=True)
    release.set()
    assert result.error is not None and result.error.startswith("timeout")
    assert time.monotonic() - started < 2.0


def test_closed_port_is_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = post(f"http://127.0.0.1:{port}/", BODY, HEADERS, timeout_s=1.0, allow_private=True)
    assert result.status_code is None
    assert result.error == "connection refused"


def test_huge_response_is_read_only_up_to_the_limit(serve: Callable[[Respond], Recorder]) -> None:
    size = 50 * 1024 * 1024

    def flood(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(size // len(chunk)):
                handler.wfile.write(chunk)
        except OSError:
            pass  # the client hung up after its limit, as it should

    server = serve(flood)
    started = time.monotonic()
    result = post(
        server.url, BODY, HEADERS, timeout_s=5, allow_private=True, max_response_bytes=1000
    )
    assert result.success
    assert result.response_excerpt == "x" * 1000
    assert time.monotonic() - started < 3.0


def test_loopback_refused_before_connecting(serve: Callable[[Respond], Recorder]) -> None:
    server = serve(reply(200))
    for url in (server.url, f"http://localhost:{server.server_address[1]}/"):
        result = post(url, BODY, HEADERS, timeout_s=1.0)
        assert result.status_code is None
        assert result.error is not None and result.error.startswith("refused:")
        assert "loopback" in result.error
    assert server.requests == []


def test_unsupported_scheme_refused() -> None:
    result = post("ftp://example.com/x", BODY, HEADERS, allow_private=True)
    assert result.error is not None and result.error.startswith("refused:")


# --- TLS: connect to the checked IP while SNI and the certificate use the name ---


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_server(
    tmp_path: Path, serve: Callable[[Respond], Recorder]
) -> Callable[[str], tuple[Recorder, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")

    def start(name: str) -> tuple[Recorder, Path]:
        cert, key = _self_signed(tmp_path, name)
        server = serve(reply(200, b"ok"))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        def record_sni(sock: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
            server.sni.append(server_name)

        context.sni_callback = record_sni
        server.socket = context.wrap_socket(server.socket, server_side=True)
        return server, cert

    return start


def test_https_checks_certificate_against_the_name(
    tls_server: Callable[[str], tuple[Recorder, Path]],
) -> None:
    server, cert = tls_server("localhost")
    trust = ssl.create_default_context(cafile=str(cert))
    url = f"https://localhost:{server.server_address[1]}/hook"
    # localhost may resolve to ::1 first, where nothing listens: the next address is tried.
    result = post(url, BODY, HEADERS, timeout_s=5, allow_private=True, ssl_context=trust)
    assert result.success, result.error
    assert server.sni == ["localhost"]
    assert server.requests[0][1]["Host"] == f"localhost:{server.server_address[1]}"

    untrusted = post(url, BODY, HEADERS, timeout_s=5, allow_private=True)
    assert untrusted.error is not None and untrusted.error.startswith("tls:")


def test_https_wrong_name_fails(tls_server: Callable[[str], tuple[Recorder, Path]]) -> None:
    server, cert = tls_server("other.test")
    trust = ssl.create_default_context(cafile=str(cert))
    url = f"https://localhost:{server.server_address[1]}/hook"
    result = post(url, BODY, HEADERS, timeout_s=5, allow_private=True, ssl_context=trust)
    assert not result.success
    assert result.error is not None and result.error.startswith("tls:")
    assert server.requests == []


# --- the retry schedule ---


def test_schedule_covers_a_day_with_jitter() -> None:
    assert sum(webhook_http.RETRY_SCHEDULE_S) >= 24 * 3600
    rng = random.Random(7)
    delays = [next_delay(n, rng) for n in range(1, len(webhook_http.RETRY_SCHEDULE_S) + 2)]
    assert delays[-1] is None
    for base, delay in zip(webhook_http.RETRY_SCHEDULE_S, delays, strict=False):
        assert delay is not None and 0.8 * base <= delay <= 1.2 * base
    assert len({next_delay(1, rng) for _ in range(20)}) > 1


def test_next_delay_stops_on_success_and_gone_and_honours_retry_after() -> None:
    rng = random.Random(1)
    assert next_delay(1, rng, result=DeliveryResult(200, None, 1.0)) is None
    assert next_delay(1, rng, result=DeliveryResult(410, "HTTP 410", 1.0)) is None
    slow = next_delay(1, rng, result=DeliveryResult(429, "HTTP 429", 1.0, retry_after_s=600))
    assert slow == 600
    with pytest.raises(ValueError):
        next_delay(0, rng)
