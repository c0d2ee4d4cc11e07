"""The per-job context a backend sees: progress, tokens, cancel, deadline, artifacts.

A backend reports from its batch thread at every step and every token of every job in
the batch. None of that may wait on the network there: a decode step of a small model
takes a few milliseconds, less than the round trips it would trigger. So the context
hands its events, its throttled PostgreSQL progress and its cancel-flag polling to one
courier thread per process, which sends each round's events of every running job in one
Redis pipeline, writes the latest progress of each job, and polls every running job's
cancel flag with one MGET. `close()` takes back the job's events not sent yet (once a
round sending earlier ones is done), and `lease.finish` publishes them just before the
final status, in the same round trip: the final status always comes after them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import redis

from spool import events, redisconn, settings
from spool.jobs import CANCEL_KEY
from workers import lease
from workers.backends.base import JobCanceled, JobTimedOut

log = logging.getLogger("spool.worker")

# Progress goes to PostgreSQL at most this often (every event still goes to Redis).
PROGRESS_DB_EVERY_S = 0.5
# Redis is asked about the running jobs' cancel flags this often.
CANCEL_POLL_S = 0.05
# Events wait this long for company before they go out (one Redis round trip per round,
# not per token); a job's end sends its events at once.
COALESCE_S = 0.02
# close() waits at most this long for a round sending the job's earlier events (Redis may
# be down).
FLUSH_TIMEOUT_S = 5.0

Event = tuple[str, str, dict[str, Any]]  # (job id, type, data)


class Courier:
    """One thread per process that does the running jobs' reporting I/O, many jobs at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._progress: dict[str, tuple[lease.Claim, int, int]] = {}  # latest per job
        self._watched: dict[str, RunContext] = {}
        self._last_poll = 0.0
        self._first_at: float | None = None  # when the oldest unsent item was handed in
        self._sending: set[str] = set()  # jobs with items in the round being sent now
        self._thread: threading.Thread | None = None

    def event(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        with self._cond:
            self._events.append((job_id, type_, data))
            self._handed_in()

    def progress(self, claim: lease.Claim, current: int, total: int) -> None:
        with self._cond:
            self._progress[claim.job_id] = (claim, current, total)
            self._handed_in()

    def _handed_in(self) -> None:  # with the lock held
        if self._first_at is None:  # the first of a round wakes the thread; not each one
            self._first_at = time.monotonic()
            self._wake()

    def watch(self, ctx: RunContext) -> None:
        with self._cond:
            self._watched[ctx.job_id] = ctx
            if len(self._watched) == 1:
                # The first job after an idle spell starts the poll clock: its first poll
                # comes CANCEL_POLL_S into it, as for every later job, so a job shorter
                # than that (an echo) costs no MGET racing it for the CPU.
                self._last_poll = time.monotonic()
                self._wake()
            elif self._thread is None or not self._thread.is_alive():
                self._wake()  # else it is polling already: no wake-up per job

    def unwatch(self, ctx: RunContext) -> None:
        with self._cond:
            if self._watched.get(ctx.job_id) is ctx:
                del self._watched[ctx.job_id]

    def take(self, job_id: str, timeout: float = FLUSH_TIMEOUT_S) -> list[Event] | None:
        """The job's events not sent yet, taken back for its finish to send ahead of its
        end in the same round trip: a job shorter than COALESCE_S (an echo) costs one
        Redis round trip for its whole stream instead of two. Its unsaved progress is
        dropped (the finish records the last). Waits while a round is sending earlier
        items of the job, so its events keep their order; None if that took too long."""
        with self._cond:
            mine = [e for e in self._events if e[0] == job_id]
            if mine:
                self._events = [e for e in self._events if e[0] != job_id]
            self._progress.pop(job_id, None)
            if not self._cond.wait_for(lambda: job_id not in self._sending, timeout):
                return None
        return coalesce(mine)

    def _wake(self) -> None:  # with the lock held
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="spool-courier", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._first_at is not None:  # something to send
                        left = self._first_at + COALESCE_S - now
                        if left <= 0:
                            break
                    elif self._watched:  # nothing to send: poll the cancel flags in time
                        left = self._last_poll + CANCEL_POLL_S - now
                        if left <= 0:
                            break
                    else:
                        left = None
                    self._cond.wait(left)
                batch, self._events = self._events, []
                progress, self._progress = self._progress, {}
                self._first_at = None
                watched = list(self._watched.values())
                self._sending = {e[0] for e in batch} | set(progress)
            try:
                events.publish_many(coalesce(batch))  # in order, one round trip; never raises
                for claim, current, total in progress.values():
                    self._save_progress(claim, current, total)
                now = time.monotonic()
                if watched and now - self._last_poll >= CANCEL_POLL_S:
                    self._last_poll = now
                    _poll_cancel(watched)
            finally:
                with self._cond:
                    self._sending = set()
                    self._cond.notify_all()

    @staticmethod
    def _save_progress(claim: lease.Claim, current: int, total: int) -> None:
        try:
            lease.progress(claim, current, total)
        except Exception as exc:  # progress is advisory: the job goes on
            log.warning("progress of %s not saved: %s", claim.job_id, exc)


def coalesce(batch: list[Event]) -> list[Event]:
    """One round's events, each job's reporting folded: its tokens become one token event
    (their texts joined) and only its latest progress is kept, after them.

    A text job reports a token and a progress at every decode step, a few milliseconds
    apart: unfolded, a batch of 8 such jobs sent ~16 stream entries per step, each one
    encoded, appended and read by every SSE client. A reader sees the same text and the
    same latest progress, in fewer, larger events. Any other event of a job is a barrier:
    nothing of it is moved across one.
    """
    out: list[Event | None] = []
    token_at: dict[str, int] = {}  # job → index in `out` of its token event still growing
    progress_at: dict[str, int] = {}  # job → index in `out` of its latest progress
    for job_id, type_, data in batch:
        if type_ == "token" and (i := token_at.get(job_id)) is not None:
            text = cast(Event, out[i])[2]["text"] + data["text"]
            out[i] = (job_id, type_, {**data, "text": text})
            continue
        if type_ == "token":
            token_at[job_id] = len(out)
        elif type_ == "progress":
            if (i := progress_at.get(job_id)) is not None:
                out[i] = None  # superseded by this one, which comes after the tokens
            progress_at[job_id] = len(out)
        else:
            token_at.pop(job_id, None)
            progress_at.pop(job_id, None)
        out.append((job_id, type_, data))
    return [item for item in out if item is not None]


def _poll_cancel(watched: list[RunContext]) -> None:
    try:
        keys = [CANCEL_KEY.format(ctx.job_id) for ctx in watched]
        flags = cast(list[str | None], redisconn.client().mget(keys))
    except redis.RedisError:
        return  # the heartbeat still sees `canceling` in PostgreSQL
    for ctx, flag in zip(watched, flags, strict=True):
        if flag is not None:
            ctx.cancel_event.set()


T = TypeVar("T")


class _PerProcess(Generic[T]):
    """One `make()` per process: a forked child builds its own (threads do not survive
    fork, and the courier and heartbeat each own one)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._obj: T | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def __call__(self) -> T:
        with self._lock:
            if self._obj is None or self._pid != os.getpid():
                self._obj, self._pid = self._make(), os.getpid()
            return self._obj


courier = _PerProcess(Courier)


class RunContext:
    def __init__(self, claim: lease.Claim, base_url: str = "") -> None:
        self.claim = claim
        self.job_id = claim.job_id
        self.input: dict[str, Any] = claim.input
        self.deadline = time.monotonic() + claim.timeout_s
        self.cancel_event = threading.Event()
        self.lost = threading.Event()  # the sweeper took the job back
        self._base_url = base_url
        # Progress is written to PostgreSQL every PROGRESS_DB_EVERY_S of running, counted
        # from the first report (not from the claim: a job may wait for its batch); a job
        # done sooner writes none, and its finish records the last (`last_progress`).
        self._last_db: float | None = None
        self.last_progress: tuple[int, int] | None = None
        self._courier = courier()
        self._courier.watch(self)

    # --- reporting ----------------------------------------------------------------
    def progress(self, current: int, total: int) -> None:
        self._courier.event(self.job_id, "progress", {"current": current, "total": total})
        self.last_progress = (current, total)
        now = time.monotonic()
        if self._last_db is None:
            self._last_db = now
        elif now - self._last_db >= PROGRESS_DB_EVERY_S:
            self._last_db = now
            self._courier.progress(self.claim, current, total)

    def token(self, text: str) -> None:
        self._courier.event(self.job_id, "token", {"text": text})

    def announce_running(self) -> None:
        """The job's `running` status event, sent with the job's next round of events
        (or with its end, for a job over within COALESCE_S)."""
        data = {"status": "running", "attempt": self.claim.attempts}
        self._courier.event(self.job_id, "status", data)

    def save_artifact(self, name: str, data: bytes, content_type: str) -> str:
        from spool.artifacts import ArtifactStore

        ArtifactStore.default().put(self.job_id, name, data)
        return f"{self._base_url}/v1/files/{self.job_id}/{name}"

    def close(self) -> list[Event]:
        """The job is over: stop polling its cancel flag. Returns its events not sent yet,
        for the finish to send ahead of its final status (`lease.finish`)."""
        self._courier.unwatch(self)
        unsent = self._courier.take(self.job_id)
        if unsent is None:
            log.warning("events of %s still unsent after %.0f s", self.job_id, FLUSH_TIMEOUT_S)
            return []
        return unsent

    # --- stopping -----------------------------------------------------------------
    def canceled(self) -> bool:
        return self.cancel_event.is_set()  # set by the courier's poll or the heartbeat

    def check(self) -> None:
        if self.lost.is_set():
            raise JobCanceled("job was taken back from this worker")
        if self.canceled():
            raise JobCanceled("canceled")
        if time.monotonic() > self.deadline:
            raise JobTimedOut(f"job ran past its timeout of {self.claim.timeout_s} s")


class Heartbeat:
    """One thread per process renews the leases of all its running jobs, in one statement
    per beat (a thread started per job cost more than a tiny job itself). Notices a
    cancel request or a job taken away; a job whose lease could not be renewed for a
    whole lease is given up (`ctx.lost`), since the sweeper may hand it to another worker.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._cond = threading.Condition()
        self._jobs: dict[str, tuple[RunContext, float]] = {}  # job id → (ctx, last renewed)
        self._thread: threading.Thread | None = None
        # Waiting for a first job (not for the next beat): only then does a new job need
        # to wake the thread. A wake-up in the middle of an interval changes nothing, and
        # short jobs would cause one each time the set of running jobs empties.
        self._idle = False

    def add(self, ctx: RunContext) -> None:
        with self._cond:
            self._jobs[ctx.job_id] = (ctx, time.monotonic())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="spool-heartbeat", daemon=True
                )
                self._thread.start()
            elif self._idle:
                self._cond.notify()  # it sleeps until there is a job to renew

    def remove(self, ctx: RunContext) -> None:
        with self._cond:
            if self._jobs.get(ctx.job_id, (None,))[0] is ctx:
                del self._jobs[ctx.job_id]

    def _loop(self) -> None:
        lease_s = settings.get().lease_s
        while True:
            with self._cond:
                while not self._jobs:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                # Every job is renewed within one interval of its claim, then every interval.
                deadline = time.monotonic() + self.interval_s
                while (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                jobs = list(self._jobs.values())
            if jobs:
                self._beat(jobs, lease_s)

    def _beat(self, jobs: list[tuple[RunContext, float]], lease_s: float) -> None:
        try:
            statuses = lease.renew([ctx.claim for ctx, _ in jobs])
        except Exception:  # database unreachable: retry next beat, until the lease is gone
            now = time.monotonic()
            for ctx, renewed in jobs:
                if now - renewed >= lease_s:
                    # The sweeper may hand the job to another worker now: stop, so that
                    # it never runs twice at once.
                    self._give_up(ctx)
            return
        now = time.monotonic()
        for ctx, _ in jobs:
            status = statuses.get(ctx.job_id)
            if status is None:
                self._give_up(ctx)
                continue
            with self._cond:
                if self._jobs.get(ctx.job_id, (None,))[0] is ctx:
                    self._jobs[ctx.job_id] = (ctx, now)
            if status == "canceling":
                ctx.cancel_event.set()

    def _give_up(self, ctx: RunContext) -> None:
        ctx.lost.set()
        self.remove(ctx)


# This process's heartbeat.
heartbeat = _PerProcess(lambda: Heartbeat(settings.get().heartbeat_interval))
