"""gunicorn's response, with the status line and headers sent together with the body.

gunicorn writes a response's head and its body in two `send()` calls. On loopback, or
behind nginx, each send is a syscall here and a wake-up of the reader there: for a
small JSON answer, the second one is about a fifth of the API's CPU per request
(measured on /healthz, see BENCHMARKS.md). This response holds the head back and
puts it on the wire with the first body bytes; an answer with no body (a HEAD, a 204)
and a streamed one (SSE, chunked) still get their head before anything else.

Installed per server process by api/gunicorn_conf.py (`install`).
"""

from __future__ import annotations

from typing import Any

from gunicorn.http import wsgi


class _Held:
    """A stand-in socket that keeps what gunicorn writes to it."""

    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += data


class OneSendResponse(wsgi.Response):
    sock: Any
    _head = b""

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        sock, held = self.sock, _Held()
        self.sock = held  # gunicorn formats the head as it always does, into `held`
        try:
            super().send_headers()
        finally:
            self.sock = sock
        self._head = held.data

    def _flush_head(self) -> None:
        head, self._head = self._head, b""
        if head:
            self.sock.sendall(head)

    def _emit_body(self, data: bytes) -> None:
        if self._head and not self.chunked:
            head, self._head = self._head, b""
            self.sock.sendall(head + data)
            return
        self._flush_head()
        super()._emit_body(data)

    def sendfile(self, respiter: Any) -> bool:
        self.send_headers()
        self._flush_head()  # the file goes straight from the kernel, after the head
        return bool(super().sendfile(respiter))

    def close(self) -> None:
        self.send_headers()
        self._flush_head()
        super().close()


def install() -> None:
    """Make gunicorn build its responses with OneSendResponse (`wsgi.create` looks the
    class up by name at each request)."""
    wsgi.Response = OneSendResponse
