"""A small real HTTP server that speaks the API.md shapes, for the SDK and CLI tests."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_KEY = "sk_test_key"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


class FakeSpool(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.tokens: set[str] = set()
        self.mints = 0
        self.expires_in = 900
        self.jobs: dict[str, dict[str, Any]] = {}
        self.finish_at: dict[str, float] = {}
        self.keys: dict[str, str] = {}
        self.batches: list[tuple[str, bytes]] = []
        # Scripted answers, consumed first: (method, path) -> [(status, headers, body) | "drop"]
        self.script: dict[tuple[str, str], list[Any]] = {}
        self.event_connections = 0
        self.batch_polls: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def seen_at(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path == path]

    def new_job(self, body: dict[str, Any], finish_in: float | None = 0.3) -> dict[str, Any]:
        job_id = f"job_{len(self.jobs) + 1}"
        job = {"id": job_id, "status": "queued", **body, "output": None, "error": None}
        self.jobs[job_id] = job
        if finish_in is not None:
            self.finish_at[job_id] = time.monotonic() + finish_in
        return job


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeSpool

    def log_message(self, format: str, *args: object) -> None:
        pass

    # --- helpers ---

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, code: str, message: str, details: Any = None) -> None:
        body = {"error": {"code": code, "message": message, "details": details}}
        self.send_json(status, body)

    def handle_any(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        server = self.server
        with server.lock:
            server.seen.append(Seen(method, path, dict(self.headers.items()), body))
            scripted = server.script.get((method, path))
            step = scripted.pop(0) if scripted else None
        if step == "drop":
            self.close_connection = True
            self.connection.close()  # no answer at all: a connection error for the client
            return
        if step is not None:
            status, headers, payload = step
            self.send_json(status, payload, headers)
            return

        if path == "/v1/auth/token" and method == "POST":
            if json.loads(body).get("api_key") != API_KEY:
                return self.error(401, "invalid_api_key", "unknown API key")
            with server.lock:
                server.mints += 1
                token = f"tok{server.mints}"
                server.tokens.add(token)
            return self.send_json(
                200,
                {"access_token": token, "token_type": "Bearer", "expires_in": server.expires_in},
            )
        auth = self.headers.get("Authorization", "")
        if not (auth.startswith("Bearer ") and auth[7:] in server.tokens):
            return self.error(401, "invalid_token", "missing, invalid or expired token")
        self.route(method, path, query, body)

    def route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        server = self.server
        segments = path.strip("/").split("/")
        if method == "POST" and path == "/v1/jobs":
            key = self.headers["Idempotency-Key"]
            with server.lock:
                if key in server.keys:
                    job = server.jobs[server.keys[key]]
                else:
                    job = server.new_job(json.loads(body))
                    server.keys[key] = job["id"]
            return self.send_json(202, job, {"Location": f"/v1/jobs/{job['id']}"})
        if method == "GET" and path == "/v1/jobs":
            ids = sorted(server.jobs, reverse=True)
            start = int(query.get("cursor", ["0"])[0])
            limit = int(query.get("limit", ["2"])[0])
            page = [server.jobs[i] for i in ids[start : start + limit]]
            more = start + limit < len(ids)
            return self.send_json(
                200, {"data": page, "next_cursor": str(start + limit) if more else None}
            )
        if segments[:2] == ["v1", "jobs"] and len(segments) >= 3:
            found = server.jobs.get(segments[2])
            if found is None:
                return self.error(404, "not_found", f"no job {segments[2]}", {"id": segments[2]})
            job = found
            rest = segments[3:]
            if method == "GET" and rest == []:
                return self.send_json(200, job)
            if method == "GET" and rest == ["result"]:
                return self.result(job, float(query.get("wait", ["0"])[0]))
            if method == "GET" and rest == ["events"]:
                return self.events()
            if method == "POST" and rest == ["cancel"]:
                job["status"] = "canceled"
                return self.send_json(202, job)
        if method == "POST" and path == "/v1/batches":
            key = self.headers["Idempotency-Key"]
            with server.lock:
                server.batches.append((self.headers.get("Content-Type", ""), body))
                batch_id = "bat_" + hashlib.sha256(key.encode()).hexdigest()[:8]
                server.batch_polls.setdefault(batch_id, 0)
            counts = {"total": 4, "queued": 4}
            return self.send_json(202, {"id": batch_id, "status": "queued", "counts": counts})
        if method == "GET" and segments[:2] == ["v1", "batches"] and len(segments) == 3:
            # Each look shows one more job done; the fourth look finds the batch completed.
            with server.lock:
                done = server.batch_polls[segments[2]] = server.batch_polls[segments[2]] + 1
            done = min(done, 4)
            counts = {
                "total": 4,
                "queued": 4 - done,
                "succeeded": done - (done == 4),
                "failed": int(done == 4),
            }
            status = "completed" if done == 4 else "running"
            return self.send_json(200, {"id": segments[2], "status": status, "counts": counts})
        if method == "GET" and segments[:2] == ["v1", "batches"] and segments[3:] == ["results"]:
            rows: list[dict[str, Any]] = [
                {"custom_id": f"c{i}", "job_id": f"job_{i}", "status": "succeeded",
                 "output": {"images": [{"url": f"/v1/files/job_{i}/{n}.png", "width": 8,
                                        "height": 8, "seed": n} for n in range(2)]},
                 "error": None}
                for i in range(3)
            ]  # fmt: skip
            oom = {"code": "oom", "message": "out of memory"}
            rows.append(
                {"custom_id": "bad/../id", "job_id": "job_9", "status": "failed", "output": None,
                 "error": oom}
            )  # fmt: skip
            return self.ndjson(rows)
        if method == "GET" and segments[:2] == ["v1", "files"]:
            data = b"\x89PNG fake " + path.encode()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        if method == "GET" and path == "/v1/webhook-secret":
            return self.send_json(200, {"secret": "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"})
        return self.error(404, "not_found", "no such route")

    def result(self, job: dict[str, Any], wait: float) -> None:
        finish = self.server.finish_at.get(job["id"])
        # A long poll: held until the job ends or the wait runs out.
        until = time.monotonic() + min(wait, 60)
        while time.monotonic() < until and job["status"] != "canceled":
            if finish is not None and time.monotonic() >= finish:
                break
            time.sleep(0.02)
        if finish is not None and time.monotonic() >= finish:
            job["status"], job["output"] = "succeeded", {"value": job["input"].get("value")}
            return self.send_json(
                200, {"id": job["id"], "status": "succeeded", "output": job["output"]}
            )
        if job["status"] == "canceled":
            return self.send_json(409, {"id": job["id"], "status": "canceled", "error": None})
        return self.send_json(
            202, {"id": job["id"], "status": "queued", "progress": None}, {"Retry-After": "1"}
        )

    def events(self) -> None:
        server = self.server
        with server.lock:
            server.event_connections += 1
            first = server.event_connections == 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if first:
            # Close-delimited body, then a drop before `done`: the client must reconnect.
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b'retry: 50\n\nid: 1\nevent: status\ndata: {"status": "running"}\n\n')
            self.wfile.flush()
            time.sleep(0.1)
            self.wfile.write(b'id: 2\nevent: progress\ndata: {"current": 1, "total": 2}\n\n')
            self.wfile.write(b'id: 3\nevent: progress\ndata: {"cur')  # cut mid-event
            self.close_connection = True
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        last = self.headers.get("Last-Event-ID")
        frames = [
            f": resumed after {last}\n\n".encode(),
            b'id: 3\nevent: progress\ndata: {"current": 2, "total": 2}\n\n',
            b'id: 4\nevent: done\ndata: {"status": "succeeded"}\n\n',
        ]
        for frame in frames:
            self.wfile.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def ndjson(self, rows: list[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for row in rows:
            line = json.dumps(row).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self) -> None:
        self.handle_any("GET")

    def do_POST(self) -> None:
        self.handle_any("POST")


def api_error(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


@contextmanager
def running() -> Iterator[FakeSpool]:
    fake = FakeSpool()
    threading.Thread(target=fake.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield fake
    finally:
        fake.shutdown()
        fake.server_close()
