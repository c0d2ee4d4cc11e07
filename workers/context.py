"""The per-job context a backend sees: progress, tokens, cancel, deadline, artifacts."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from spool import events, redisconn
from spool.jobs import CANCEL_KEY
from workers import lease
from workers.backends.base import JobCanceled, JobTimedOut

# Progress goes to PostgreSQL at most this often (every event still goes to Redis).
PROGRESS_DB_EVERY_S = 0.5
# Redis is asked about the cancel flag at most this often (it is checked every step).
CANCEL_POLL_S = 0.05


class RunContext:
    def __init__(self, claim: lease.Claim, base_url: str = "") -> None:
        self.claim = claim
        self.job_id = claim.job_id
        self.input: dict[str, Any] = claim.input
        self.deadline = time.monotonic() + claim.timeout_s
        self.cancel_event = threading.Event()
        self.lost = threading.Event()  # the sweeper took the job back
        self._base_url = base_url
        self._last_db = 0.0
        self._last_cancel_poll = 0.0

    # --- reporting ----------------------------------------------------------------
    def progress(self, current: int, total: int) -> None:
        events.publish(self.job_id, "progress", {"current": current, "total": total})
        now = time.monotonic()
        if now - self._last_db >= PROGRESS_DB_EVERY_S or current >= total:
            self._last_db = now
            lease.progress(self.claim, current, total)

    def token(self, text: str) -> None:
        events.publish(self.job_id, "token", {"text": text})

    def save_artifact(self, name: str, data: bytes, content_type: str) -> str:
        from spool.artifacts import ArtifactStore

        ArtifactStore.default().put(self.job_id, name, data)
        return f"{self._base_url}/v1/files/{self.job_id}/{name}"

    # --- stopping -----------------------------------------------------------------
    def canceled(self) -> bool:
        if self.cancel_event.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_poll >= CANCEL_POLL_S:
            self._last_cancel_poll = now
            try:
                if redisconn.client().exists(CANCEL_KEY.format(self.job_id)):
                    self.cancel_event.set()
            except redis.RedisError:
                pass  # the heartbeat still sees `canceling` in PostgreSQL
        return self.cancel_event.is_set()

    def check(self) -> None:
        if self.lost.is_set():
            raise JobCanceled("job was taken back from this worker")
        if self.canceled():
            raise JobCanceled("canceled")
        if time.monotonic() > self.deadline:
            raise JobTimedOut(f"job ran past its timeout of {self.claim.timeout_s} s")


class Heartbeat(threading.Thread):
    """Renews the lease; notices a cancel request or a job taken away."""

    def __init__(self, ctx: RunContext, interval_s: float) -> None:
        super().__init__(name=f"heartbeat-{ctx.job_id}", daemon=True)
        self.ctx, self.interval_s = ctx, interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                status = lease.renew(self.ctx.claim)
            except Exception:
                continue
            if status is None:
                self.ctx.lost.set()
                return
            if status == "canceling":
                self.ctx.cancel_event.set()

    def stop(self) -> None:
        self._stop_event.set()
