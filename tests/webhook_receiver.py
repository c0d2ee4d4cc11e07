"""A real webhook receiver for tests: a stdlib HTTP server on loopback, in a thread.

It records every request (path, headers, body) and answers each path from a script
of status codes (`answer("/x", 500, 200)`: 500 first, then 200), else 200.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    def __init__(self, port: int = 0) -> None:
        self.requests: list[Received] = []
        self._scripts: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def port(self) -> int:
        return self._port

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._port}{path}"

    def answer(self, path: str, *statuses: int) -> None:
        with self._lock:
            self._scripts[path] = list(statuses)

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    script = receiver._scripts.get(self.path)
                    status = script.pop(0) if script else 200
                    receiver.requests.append(
                        Received(
                            self.path, {k.lower(): v for k, v in self.headers.items()}, body, status
                        )
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def received(self, pred: Callable[[Received], bool] = lambda r: True) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if pred(r)]

    def wait_for(
        self, pred: Callable[[Received], bool], count: int = 1, timeout: float = 30
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.received(pred)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(
            f"receiver got {len(self.received(pred))} of {count} matching requests "
            f"in {timeout}s; all: {[(r.path, r.json.get('type')) for r in self.received()]}"
        )


def of_type(event_type: str, path: str | None = None) -> Callable[[Received], bool]:
    return lambda r: r.json.get("type") == event_type and (path is None or r.path == path)
