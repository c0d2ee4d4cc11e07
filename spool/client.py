"""Python SDK for the Spool HTTP API (version 1, see API.md).

    client = Client("http://127.0.0.1:8000", api_key)
    job = client.submit("image.generate", "tiny-sd", {"prompt": "a red fox"})
    result = client.wait(job["id"])

Requests that are safe to repeat (GETs, submissions, which always carry an
Idempotency-Key, and cancels) are retried on connection errors, 429 and 503,
honouring Retry-After. Every failure is a :class:`SpoolError`.
"""

from __future__ import annotations

import builtins
import codecs
import email.utils
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

import requests
import tenacity
from urllib3.exceptions import HTTPError as Urllib3Error

from spool import __version__
from spool.webhook_signing import WebhookVerificationError
from spool.webhook_signing import verify as verify_webhook

__all__ = [
    "AuthError",
    "Client",
    "Conflict",
    "Event",
    "NotFound",
    "RateLimited",
    "SSEDecoder",
    "SpoolError",
    "Unavailable",
    "ValidationFailed",
    "WaitTimeout",
    "WebhookVerificationError",
    "parse_sse",
    "verify_webhook",
]

JSON = dict[str, Any]
JOB_TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})
BATCH_TERMINAL = frozenset({"completed", "canceled"})
MAX_WAIT_S = 60  # the server holds a long poll at most this long (API.md)


# --- errors -------------------------------------------------------------------------


class SpoolError(Exception):
    """An error answer of the API (``status`` None: no answer at all)."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: Any = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        prefix = f"{status} {code}" if status is not None else code
        super().__init__(f"{prefix}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after


class AuthError(SpoolError):
    """401 or 403: a bad or revoked API key, or not allowed."""


class NotFound(SpoolError):
    """404: no such id, or not yours."""


class Conflict(SpoolError):
    """409: the resource is in the wrong state, or the same Idempotency-Key is in flight."""


class ValidationFailed(SpoolError):
    """400, 413, 415 or 422: the request itself is wrong; ``details`` names the fields."""


class RateLimited(SpoolError):
    """429: too many requests or too many queued jobs; see ``retry_after``."""


class Unavailable(SpoolError):
    """503 (or 502/504 from a proxy), or no connection: nothing was accepted."""


class WaitTimeout(SpoolError, TimeoutError):
    """The job or batch did not finish within the time given."""


_ERRORS_BY_STATUS: dict[int, type[SpoolError]] = {
    400: ValidationFailed,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    413: ValidationFailed,
    415: ValidationFailed,
    422: ValidationFailed,
    429: RateLimited,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_from(response: requests.Response) -> SpoolError:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "error")
        message = str(error.get("message") or response.reason)
        details = error.get("details")
    else:
        code = (response.reason or "error").lower().replace(" ", "_")
        message = response.text[:300] or response.reason or "no message"
        details = None
    cls = _ERRORS_BY_STATUS.get(response.status_code, SpoolError)
    return cls(
        response.status_code,
        code,
        message,
        details,
        retry_after=_retry_after(response.headers.get("Retry-After")),
    )


# --- server-sent events ---------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One server-sent event. ``data`` is the raw text; :meth:`json` decodes it."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


_EOL = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Incremental ``text/event-stream`` parser (the WHATWG rules), fed raw bytes.

    ``last_event_id`` (the id of the last complete event) and ``retry_ms`` are
    what a reconnection needs.
    """

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_event_id = last_event_id
        # An id only counts once its event is complete, or a reconnection would skip it.
        self._id = last_event_id
        self.retry_ms: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._data: list[str] = []
        self._type = ""

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        return self._consume(self._buffer + text, final=False)

    def close(self) -> list[Event]:
        """End of stream: a pending, unterminated event is dropped, as the spec says."""
        events = self._consume(self._buffer + self._decoder.decode(b"", final=True), final=True)
        self._data, self._type = [], ""
        return events

    def _consume(self, text: str, final: bool) -> list[Event]:
        held = ""
        if not final and text.endswith("\r"):
            text, held = text[:-1], "\r"  # may be the first half of a CRLF split across chunks
        *lines, rest = _EOL.split(text)
        self._buffer = rest + held
        events: list[Event] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            data, self._data = self._data, []
            kind, self._type = self._type, ""
            self.last_event_id = self._id
            if not data:
                return None
            return Event(kind or "message", "\n".join(data), self._id)
        if line.startswith(":"):
            return None  # a comment, e.g. a keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None


def parse_sse(chunks: Iterable[bytes]) -> Iterator[Event]:
    """Events from an iterable of raw byte chunks."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.close()


# --- the client -------------------------------------------------------------------------


def _q(value: str) -> str:
    return quote(str(value), safe="")


def _wait_param(seconds: float) -> int:
    return max(1, min(MAX_WAIT_S, math.ceil(seconds)))


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _raw_chunks(response: requests.Response) -> Iterator[bytes]:
    # read1 hands over whatever has arrived: an event is seen as soon as it is sent,
    # whether the stream is chunked or simply ends when the connection closes.
    raw = response.raw
    while True:
        chunk = raw.read1(64 * 1024, decode_content=True)
        if not chunk:
            return
        yield chunk


class Client:
    """A client of one Spool server. The token cache is thread-safe; for heavy use from
    many threads, give each thread its own client (requests' Session is not guaranteed
    thread-safe)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        timeout: float = 30.0,
        *,
        max_retries: int = 5,
        max_retry_wait: float = 60.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", f"spool-python/{__version__}")
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = threading.Lock()
        self._sleep: Callable[[float], None] = time.sleep
        self._backoff = tenacity.wait_random_exponential(multiplier=0.25, max=10)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    verify_webhook = staticmethod(verify_webhook)

    # --- plumbing ---

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.url + (path if path.startswith("/") else "/" + path)

    def _access_token(self, *, renew: bool = False, stale: str | None = None) -> str:
        with self._token_lock:
            # Another thread may already have replaced the token that got the 401.
            expired = self._token is None or time.monotonic() >= self._token_expires
            if expired or (renew and self._token == stale):
                # Minting a token changes nothing on the server, so it may be retried.
                body = self._json(
                    "POST", "/v1/auth/token", json_body={"api_key": self.api_key}, auth=False,
                    idempotent=True,
                )  # fmt: skip
                lifetime = float(body.get("expires_in") or 900)
                self._token = str(body["access_token"])
                # Renew early so that a request never leaves with a token about to expire.
                self._token_expires = time.monotonic() + lifetime - min(60.0, lifetime / 10)
            assert self._token is not None
            return self._token

    def _transient(self, exc: BaseException) -> bool:
        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return True
        if isinstance(exc, RateLimited | Unavailable) and exc.status is not None:
            return exc.retry_after is None or exc.retry_after <= self.max_retry_wait
        return False

    def _wait_before_retry(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(retry_after)
        return float(self._backoff(state))

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        data: bytes | IO[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
        idempotent: bool | None = None,
        stream: bool = False,
        read_timeout: float | None = None,
        accept: tuple[int, ...] = (),
    ) -> requests.Response:
        """Send one API request with retries; return the response or raise SpoolError."""
        url = self._url(path)
        send_headers = dict(headers or {})
        if idempotent is None:
            idempotent = method in ("GET", "HEAD") or "Idempotency-Key" in send_headers
        if json_body is not None:
            data = json.dumps(json_body, separators=(",", ":")).encode()
            send_headers.setdefault("Content-Type", "application/json")
        start = data.tell() if data is not None and not isinstance(data, bytes) else 0
        timeout = (self.timeout, read_timeout if read_timeout is not None else self.timeout)

        def send(token: str | None) -> requests.Response:
            if data is not None and not isinstance(data, bytes):
                data.seek(start)  # a retried upload starts over
            if token is not None:
                send_headers["Authorization"] = f"Bearer {token}"
            return self.session.request(
                method, url, params=params, data=data, headers=send_headers,
                timeout=timeout, stream=stream, allow_redirects=method == "GET",
            )  # fmt: skip

        def attempt() -> requests.Response:
            token = self._access_token() if auth else None
            response = send(token)
            if response.status_code == 401 and auth:
                response.close()
                response = send(self._access_token(renew=True, stale=token))
            if response.status_code >= 400 and response.status_code not in accept:
                error = _error_from(response)
                response.close()
                raise error
            return response

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda exc: bool(idempotent) and self._transient(exc)
            ),
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self._wait_before_retry,
            sleep=lambda seconds: self._sleep(seconds),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except requests.Timeout as exc:
            raise Unavailable(None, "timeout", f"{method} {url}: {exc}") from exc
        except requests.RequestException as exc:
            raise Unavailable(None, "connection_error", f"{method} {url}: {exc}") from exc

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _pages(self, path: str, filters: Mapping[str, Any]) -> Iterator[JSON]:
        params = {key: value for key, value in filters.items() if value is not None}
        while True:
            page = self._json("GET", path, params=params)
            yield from page.get("data", [])
            cursor = page.get("next_cursor")
            if not cursor:
                return
            params["cursor"] = cursor

    # --- jobs ---

    def submit(
        self,
        kind: str,
        model: str,
        input: JSON,
        *,
        priority: str | None = None,
        webhook: str | None = None,
        webhook_events: Iterable[str] | None = None,
        ttl_s: float | None = None,
        timeout_s: float | None = None,
        metadata: JSON | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> JSON:
        """Submit a job; with ``wait``, the server holds the answer until it ends (≤ 60 s)."""
        body: JSON = {"kind": kind, "model": model, "input": input}
        optional = {
            "priority": priority,
            "webhook": webhook,
            "webhook_events": None if webhook_events is None else builtins.list(webhook_events),
            "ttl_s": ttl_s,
            "timeout_s": timeout_s,
            "metadata": metadata,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        # A key of our own makes our retries safe: the server answers the same job again.
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        read_timeout = None
        if wait:
            headers["Prefer"] = f"wait={_wait_param(wait)}"
            read_timeout = _wait_param(wait) + self.timeout
        return self._json(
            "POST", "/v1/jobs", json_body=body, headers=headers, read_timeout=read_timeout
        )

    def get(self, id: str) -> JSON:
        return self._json("GET", f"/v1/jobs/{_q(id)}")

    def list(self, **filters: Any) -> Iterator[JSON]:
        """Jobs, newest first, across pages: status=, kind=, model=, batch_id=, limit=."""
        return self._pages("/v1/jobs", filters)

    def _result_response(self, id: str, wait: float | None) -> requests.Response:
        params = {"wait": _wait_param(wait)} if wait else None
        read_timeout = _wait_param(wait) + self.timeout if wait else None
        response = self._request(
            "GET", f"/v1/jobs/{_q(id)}/result", params=params, read_timeout=read_timeout,
            accept=(409,),
        )  # fmt: skip
        if response.status_code == 409 and "status" not in response.json():
            raise _error_from(response)
        return response

    def result(self, id: str, wait: float | None = None) -> JSON:
        """``{"id", "status", ...}``: output when succeeded, error when failed, else progress."""
        return self._result_response(id, wait).json()

    def wait(self, id: str, timeout: float | None = None) -> JSON:
        """Block until the job ends and return its result; WaitTimeout after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(None, "wait_timeout", f"job {id} did not end within {timeout} s")
            hold = _wait_param(MAX_WAIT_S if remaining is None else remaining)
            started = time.monotonic()
            response = self._result_response(id, hold)
            body: JSON = response.json()
            if body.get("status") in JOB_TERMINAL:
                return body
            # The server answered before the hold ran out and the job is not done: it does
            # not long-poll (an old server, a proxy). Back off instead of spinning.
            if time.monotonic() - started < hold - 1:
                pause = min(_retry_after(response.headers.get("Retry-After")) or 1.0, 5.0)
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                self._sleep(pause)

    def cancel(self, id: str) -> JSON:
        return self._json("POST", f"/v1/jobs/{_q(id)}/cancel", idempotent=True)

    def retry(self, id: str) -> JSON:
        """A new job with the same request (never retried itself: it creates a job)."""
        return self._json("POST", f"/v1/jobs/{_q(id)}/retry", idempotent=False)

    def events(self, id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's live events, ending with ``done``; reconnects with Last-Event-ID."""
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            decoder = SSEDecoder(last_event_id)
            try:
                response = self._request(
                    "GET", f"/v1/jobs/{_q(id)}/events", headers=headers, stream=True,
                    read_timeout=max(self.timeout, 60.0),
                )  # fmt: skip
                with response:
                    for chunk in _raw_chunks(response):
                        for event in decoder.feed(chunk):
                            failures = 0
                            yield event
                            if event.event == "done":
                                return
                    decoder.close()
                problem = "the stream ended before 'done'"
            except (Urllib3Error, OSError, requests.RequestException) as exc:
                problem = str(exc)
            except Unavailable as exc:
                problem = exc.message
            failures += 1
            if failures > self.max_retries:
                raise Unavailable(None, "stream_interrupted", f"events of {id}: {problem}")
            last_event_id = decoder.last_event_id
            pause = decoder.retry_ms / 1000 if decoder.retry_ms is not None else 0.5 * failures
            self._sleep(min(pause, 30.0))

    # --- batches ---

    def submit_batch(
        self,
        jobs: Iterable[JSON],
        *,
        webhook: str | None = None,
        metadata: JSON | None = None,
        idempotency_key: str | None = None,
        ndjson: bool = True,
    ) -> JSON:
        """Submit many jobs at once; each may carry a ``custom_id``.

        The body is built in memory so that a retry can send it again. NDJSON carries
        jobs only, so a batch ``webhook`` or ``metadata`` sends a JSON body instead.
        """
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        read_timeout = max(self.timeout, 300.0)  # validating 50,000 jobs takes a while
        if ndjson and webhook is None and metadata is None:
            headers["Content-Type"] = "application/x-ndjson"
            data = b"".join(json.dumps(job, separators=(",", ":")).encode() + b"\n" for job in jobs)
            return self._json(
                "POST", "/v1/batches", data=data, headers=headers, read_timeout=read_timeout
            )
        body: JSON = {"jobs": builtins.list(jobs)}
        if webhook is not None:
            body["webhook"] = webhook
        if metadata is not None:
            body["metadata"] = metadata
        return self._json(
            "POST", "/v1/batches", json_body=body, headers=headers, read_timeout=read_timeout
        )

    def submit_batch_file(
        self, path: str | os.PathLike[str], *, idempotency_key: str | None = None
    ) -> JSON:
        """Upload an NDJSON file as a batch, streamed from disk.

        The default Idempotency-Key is the file's SHA-256, so submitting the same file
        again (after an interruption, say) gives back the same batch within 24 h.
        """
        with open(path, "rb") as file:
            if idempotency_key is None:
                idempotency_key = "batch-sha256-" + hashlib.file_digest(file, "sha256").hexdigest()
                file.seek(0)
            headers = {"Idempotency-Key": idempotency_key, "Content-Type": "application/x-ndjson"}
            return self._json(
                "POST", "/v1/batches", data=file, headers=headers,
                read_timeout=max(self.timeout, 300.0),
            )  # fmt: skip

    def batch(self, id: str) -> JSON:
        return self._json("GET", f"/v1/batches/{_q(id)}")

    def batch_results(self, id: str) -> Iterator[JSON]:
        """One ``{"custom_id", "job_id", "status", "output", "error"}`` per job, streamed."""
        response = self._request(
            "GET", f"/v1/batches/{_q(id)}/results", stream=True,
            headers={"Accept": "application/x-ndjson"},
        )  # fmt: skip
        with response:
            for line in response.iter_lines(chunk_size=64 * 1024):
                if line.strip():
                    yield json.loads(line)

    def cancel_batch(self, id: str) -> JSON:
        return self._json("POST", f"/v1/batches/{_q(id)}/cancel", idempotent=True)

    def list_batches(self, **filters: Any) -> Iterator[JSON]:
        """Batches, newest first, across pages."""
        return self._pages("/v1/batches", filters)

    def wait_batch(
        self,
        id: str,
        timeout: float | None = None,
        *,
        interval: float = 2.0,
        on_update: Callable[[JSON], None] | None = None,
    ) -> JSON:
        """Poll the batch until it is completed or canceled (batches have no long poll)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.batch(id)
            if on_update is not None:
                on_update(batch)
            if batch.get("status") in BATCH_TERMINAL:
                return batch
            if deadline is not None and time.monotonic() + interval > deadline:
                raise WaitTimeout(
                    None, "wait_timeout", f"batch {id} did not end within {timeout} s"
                )
            self._sleep(interval)

    # --- files and webhooks ---

    def download(self, url: str, path: str | os.PathLike[str]) -> Path:
        """Save an output file (a ``/v1/files/...`` URL, relative or absolute) to ``path``.

        ``path`` may be a directory; the file keeps its name. Our token goes only to
        our own server, never to another host (a signed object-store link, say).
        """
        full = self._url(url)
        own = _origin(full) == _origin(self.url)
        target = Path(path)
        if target.is_dir():
            name = Path(urlsplit(full).path).name or "download"
            target = target / name
        response = self._request("GET", full, stream=True, auth=own)
        with response, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            try:
                for chunk in response.iter_content(chunk_size=256 * 1024):
                    tmp.write(chunk)
                tmp.close()
                os.replace(tmp.name, target)  # no half-written file under the final name
            except BaseException:
                tmp.close()
                os.unlink(tmp.name)
                raise
        return target

    def webhook_secret(self) -> str:
        """The ``whsec_…`` secret that signs this user's webhooks."""
        return str(self._json("GET", "/v1/webhook-secret")["secret"])

    def models(self) -> builtins.list[JSON]:
        return self._json("GET", "/v1/models")
