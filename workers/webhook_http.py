"""One webhook HTTP attempt, SSRF-safe, and the retry schedule around it.

The URL is checked and resolved once by :mod:`spool.netguard`; the connection
then goes to that checked address (the Host header, TLS SNI and the certificate
check still use the name), so a second DNS answer can never redirect a delivery
to an internal address. Redirects are not followed. This module makes no
database writes: the delivery task records what :func:`post` returns.
"""

from __future__ import annotations

import email.utils
import functools
import random
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

import certifi
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from spool import __version__
from spool.netguard import ResolvedTarget, UnresolvableHost, UnsafeURL, check_url

USER_AGENT = f"Spool-Webhooks/{__version__}"
DEFAULT_TIMEOUT_S = 15.0
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024

# Delays after the first try, as the Standard Webhooks spec suggests: about 75 h in all.
RETRY_SCHEDULE_S: tuple[float, ...] = (
    5,
    5 * 60,
    30 * 60,
    2 * 3600,
    5 * 3600,
    10 * 3600,
    14 * 3600,
    20 * 3600,
    24 * 3600,
)
JITTER = 0.15
# A receiver's Retry-After is honoured, but no further out than the longest step.
MAX_RETRY_AFTER_S = RETRY_SCHEDULE_S[-1]


@dataclass(frozen=True)
class DeliveryResult:
    """What one attempt gave: an HTTP status, or an error (or both, for a 3xx)."""

    status_code: int | None
    error: str | None
    duration_ms: float
    response_excerpt: str = ""
    retry_after_s: float | None = None

    @property
    def success(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        """410 Gone: the receiver wants no more deliveries; stop retrying."""
        return self.status_code == 410


def next_delay(
    attempt: int, rng: random.Random, *, result: DeliveryResult | None = None
) -> float | None:
    """Seconds to wait before the next try after ``attempt`` tries (1-based) failed.

    None means stop: the schedule is exhausted, or ``result`` succeeded or was 410.
    ``result.retry_after_s`` (from a 429 or 503) lengthens the delay, never shortens it.
    """
    if attempt < 1:
        raise ValueError("attempt counts tries made so far, starting at 1")
    if result is not None and (result.success or result.gone):
        return None
    if attempt > len(RETRY_SCHEDULE_S):
        return None
    # Jitter spreads the retries of many deliveries that failed together (an outage).
    delay = RETRY_SCHEDULE_S[attempt - 1] * rng.uniform(1 - JITTER, 1 + JITTER)
    if result is not None and result.retry_after_s is not None:
        delay = max(delay, min(result.retry_after_s, MAX_RETRY_AFTER_S))
    return delay


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    # Built once per process: loading the CA bundle costs more than the handshake.
    return ssl.create_default_context(cafile=certifi.where())


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _pool(
    target: ResolvedTarget, timeout: urllib3.Timeout, ssl_context: ssl.SSLContext | None
) -> urllib3.HTTPConnectionPool:
    common = {"timeout": timeout, "retries": False, "maxsize": 1, "block": False}
    if target.scheme == "https":
        # Connect to the checked IP; SNI and the certificate check use the URL's name.
        return urllib3.HTTPSConnectionPool(
            target.address,
            target.port,
            server_hostname=target.host,
            ssl_context=ssl_context or _default_ssl_context(),
            cert_reqs="CERT_REQUIRED",
            **common,  # type: ignore[arg-type]
        )
    return urllib3.HTTPConnectionPool(target.address, target.port, **common)  # type: ignore[arg-type]


def _describe(exc: Exception, timeout_s: float) -> tuple[str, bool]:
    """A short error text, and whether trying another address of the host makes sense."""
    # NewConnectionError subclasses ConnectTimeoutError, so it is tested first.
    if isinstance(exc, NewConnectionError):
        cause = exc.__context__ or exc
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused", True
        if isinstance(cause, TimeoutError):
            return f"timeout: no connection within {timeout_s:g} s", True
        return f"connection failed: {cause}", True
    if isinstance(exc, ConnectTimeoutError):
        return f"timeout: no connection within {timeout_s:g} s", True
    if isinstance(exc, ReadTimeoutError):
        return f"timeout: no response within {timeout_s:g} s", False
    if isinstance(exc, SSLError):
        return f"tls: {exc}", False
    if isinstance(exc, ProtocolError):
        cause = exc.args[1] if len(exc.args) > 1 else exc
        return f"connection error: {cause}", False
    return f"{type(exc).__name__}: {exc}", False


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    allow_private: bool = False,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> DeliveryResult:
    """POST ``body`` to ``url`` once. Never raises for network or HTTP failures.

    The whole attempt (resolution aside) is bounded by ``timeout_s``; if a host has
    several addresses, the next one is tried only when connecting failed.
    ``ssl_context`` replaces the default (certifi CAs), e.g. for a private CA.
    """
    start = time.monotonic()
    deadline = start + timeout_s

    def elapsed_ms() -> float:
        return (time.monotonic() - start) * 1000.0

    try:
        targets = check_url(url, allow_private)
    except UnresolvableHost as exc:
        return DeliveryResult(None, f"dns: {exc.reason}", elapsed_ms())
    except UnsafeURL as exc:
        return DeliveryResult(None, f"refused: {exc.reason}", elapsed_ms())

    error = "no address to connect to"
    for target in targets:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            error = f"timeout: no connection within {timeout_s:g} s"
            break
        send_headers = {name: value for name, value in headers.items() if name.lower() != "host"}
        send_headers.setdefault("User-Agent", USER_AGENT)
        send_headers["Host"] = target.host_header
        timeout = urllib3.Timeout(connect=remaining, read=remaining)
        pool = _pool(target, timeout, ssl_context)
        try:
            response = pool.urlopen(
                "POST",
                target.path,
                body=body,
                headers=send_headers,
                redirect=False,
                retries=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=False,
            )
        except HTTPError as exc:
            pool.close()
            error, try_next = _describe(exc, timeout_s)
            if try_next:
                continue
            return DeliveryResult(None, error, elapsed_ms())
        try:
            excerpt = _read_limited(response, max_response_bytes, deadline)
        finally:
            # Not reused: the next delivery may go elsewhere, and unread bytes stay unread.
            response.close()
            pool.close()
        status = response.status
        status_error = None
        if 300 <= status < 400:
            location = response.headers.get("Location", "")
            status_error = f"redirect to {location!r} not followed" if location else "redirect"
        elif not 200 <= status < 300:
            status_error = f"HTTP {status}"
        return DeliveryResult(
            status,
            status_error,
            elapsed_ms(),
            excerpt,
            _retry_after(response.headers.get("Retry-After")),
        )
    return DeliveryResult(None, error, elapsed_ms())


def _read_limited(response: urllib3.BaseHTTPResponse, limit: int, deadline: float) -> str:
    """Up to ``limit`` bytes of the body; the status already decided the outcome."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < limit and time.monotonic() < deadline:
            chunk = response.read(min(16 * 1024, limit - size), decode_content=False)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (HTTPError, OSError):
        pass  # a body cut short still leaves the status, which is what counts
    return b"".join(chunks).decode("utf-8", errors="replace")
