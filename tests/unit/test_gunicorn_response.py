"""api.gunicorn_response: a response's head goes out with its first body bytes, in one
send(); a response without a body, and a streamed one, still get their head first."""

from __future__ import annotations

from gunicorn.config import Config
from gunicorn.http.parser import RequestParser

from api.gunicorn_response import OneSendResponse


class Sock:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))


def _response(method: str = "GET") -> tuple[OneSendResponse, Sock]:
    cfg = Config()
    raw = f"{method} /x HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    req = next(iter(RequestParser(cfg, iter([raw]), ("127.0.0.1", 1))))
    sock = Sock()
    return OneSendResponse(req, sock, cfg), sock


def test_head_and_body_in_one_send() -> None:
    resp, sock = _response()
    resp.start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    resp.write(b"{}")
    resp.close()
    assert len(sock.sent) == 1
    assert sock.sent[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert sock.sent[0].endswith(b"Content-Length: 2\r\n\r\n{}")


def test_a_response_without_body_still_sends_its_head() -> None:
    resp, sock = _response("HEAD")
    resp.start_response("200 OK", [("Content-Length", "2")])
    resp.write(b"{}")  # dropped: a HEAD has no body
    resp.close()
    assert len(sock.sent) == 1
    assert sock.sent[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert sock.sent[0].endswith(b"\r\n\r\n")


def test_a_streamed_response_sends_its_head_then_each_chunk() -> None:
    resp, sock = _response()
    resp.start_response("200 OK", [("Content-Type", "text/event-stream")])  # no length
    resp.write(b"data: 1\n\n")
    resp.write(b"data: 2\n\n")
    resp.close()
    assert sock.sent[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in sock.sent[0]
    assert sock.sent[1:] == [b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2\n\n\r\n", b"0\r\n\r\n"]
