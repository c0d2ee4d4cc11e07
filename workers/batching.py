"""Micro-batching: jobs running at once on one model share its forward passes.

Each job runs in its own worker thread and calls `MicroBatcher.run(ctx)`, which blocks.
One batch thread per model takes the oldest waiting job, gathers others with the same
`backend.batch_key` for at most `wait_ms` (or until `max_batch_size`), runs them with
one `backend.predict_each`, and hands every caller its own result or exception as soon
as the backend has it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from spool import metrics
from spool.registry import ModelSpec
from workers.backends.base import Backend, JobContext, Result

log = logging.getLogger("spool.batching")

# A batch that keeps taking in jobs (a decode loop) adds to spool_model_busy_seconds this
# often while it runs, not only at its end.
BUSY_COUNT_EVERY_S = 1.0


@dataclass(eq=False)
class _Waiting:
    ctx: JobContext
    key: Hashable
    done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None
    at: float = field(default_factory=time.monotonic)  # when it came in


class MicroBatcher:
    def __init__(self, backend: Backend, max_batch_size: int, wait_ms: float) -> None:
        self.backend = backend
        self.max_batch_size = max(1, int(max_batch_size))
        self.wait_s = max(0.0, float(wait_ms)) / 1000
        self._cond = threading.Condition()
        self._waiting: deque[_Waiting] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._setup_lock = threading.Lock()
        self._ready = False
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent sizes, for metrics and tests

    def setup(self) -> None:
        """Load the model now (a worker may call this at start to be warm); runs once."""
        with self._setup_lock:
            if not self._ready:
                started = time.monotonic()
                self.backend.setup()
                self._ready = True
                seconds = time.monotonic() - started
                metrics.observe_model_loaded(self.backend.spec.name, seconds)
                log.info(
                    "model loaded", extra={"model": self.backend.spec.name, "seconds": seconds}
                )

    def run(self, ctx: JobContext) -> dict[str, Any]:
        """Run one job in the next compatible batch; blocks until its result is ready."""
        item = _Waiting(ctx, self.backend.batch_key(ctx.input))  # may raise: a bad input
        with self._cond:
            if self._closed:
                raise RuntimeError("the micro-batcher is closed")
            self._waiting.append(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"batch-{self.backend.spec.name}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        item.done.wait()
        if isinstance(item.result, BaseException):
            raise item.result
        if item.result is None:
            raise RuntimeError("the batch ended without a result for this job")
        return item.result

    @property
    def limit(self) -> int:
        """Jobs per batch: max_batch_size, or less where the backend lowered it."""
        lowered = self.backend.batch_limit
        return self.max_batch_size if lowered is None else max(1, min(lowered, self.max_batch_size))

    def pending(self) -> int:
        """Jobs waiting for a batch (not counting those in the batch running now)."""
        with self._cond:
            return len(self._waiting)

    def close(self) -> None:
        """Stop the batch thread once the jobs already waiting are done."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    # --- the batch thread ---------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            self._run(batch)

    def _gather(self) -> list[_Waiting] | None:
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._waiting.popleft()
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            limit = self.limit
            while len(batch) < limit:
                # Take compatible jobs in arrival order; the others wait for their own batch.
                for item in list(self._waiting):
                    if item.key == first.key:
                        self._waiting.remove(item)
                        batch.append(item)
                        if len(batch) == limit:
                            break
                left = deadline - time.monotonic()
                if len(batch) == limit or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _run(self, batch: list[_Waiting]) -> None:
        name = self.backend.spec.name
        self.batch_sizes.append(len(batch))
        metrics.MICROBATCH_SIZE.labels(name).observe(len(batch))
        lowered = self.backend.caps.lowest()
        metrics.MODEL_BATCH_LIMIT.labels(name).set(
            self.max_batch_size if lowered is None else min(lowered, self.max_batch_size)
        )
        counted = time.perf_counter()  # the model's busy time is counted up to here

        def count_busy() -> None:
            nonlocal counted
            now = time.perf_counter()
            metrics.MODEL_BUSY.labels(name).inc(now - counted)
            counted = now

        def deliver(index: int, result: Result) -> None:
            item = batch[index]
            if not item.done.is_set():  # the first result of a job stands
                item.result = result
                item.done.set()  # its caller finishes the job while the batch goes on

        def admit(running: int) -> list[tuple[int, JobContext]]:
            # Called between two steps of a running batch, which may go on for long while
            # jobs keep joining: its busy time is counted as it goes.
            if time.perf_counter() - counted >= BUSY_COUNT_EVERY_S:
                count_busy()
            room = self.limit - running
            if room <= 0 or not self._waiting:  # a glance without the lock: most steps
                return []
            with self._cond:
                joining = [item for item in self._waiting if item.key == batch[0].key]
                if not joining:
                    return []
                if len(joining) < room and time.monotonic() - joining[0].at < self.wait_s:
                    # Short of a full batch, joiners gather for up to wait_ms like a batch
                    # does: each group costs the model a forward pass of its own prompts.
                    return []
                joining = joining[:room]
                for item in joining:
                    self._waiting.remove(item)
            first = len(batch)
            batch.extend(joining)
            self.batch_sizes[-1] = len(batch)
            metrics.MICROBATCH_JOINED.labels(name).inc(len(joining))
            return [(first + i, item.ctx) for i, item in enumerate(joining)]

        try:
            self.setup()
            counted = time.perf_counter()  # not the model's load
            try:
                self.backend.predict_each([item.ctx for item in batch], deliver, admit)
            finally:
                count_busy()
            if missing := sum(not item.done.is_set() for item in batch):
                raise RuntimeError(f"backend gave no result for {missing} of {len(batch)} jobs")
        except BaseException as exc:  # raised in every caller still waiting, never lost
            for item in batch:
                if not item.done.is_set():
                    item.result = exc
                    item.done.set()


_batchers: dict[str, MicroBatcher] = {}
_batchers_pid = os.getpid()
_batchers_lock = threading.Lock()


def batcher_for(spec: ModelSpec) -> MicroBatcher:
    """The process's batcher for a model (one per model; a forked child builds its own)."""
    from workers.backends import backend_class

    global _batchers_pid
    with _batchers_lock:
        if _batchers_pid != os.getpid():  # threads do not survive fork
            _batchers.clear()
            _batchers_pid = os.getpid()
        batcher = _batchers.get(spec.name)
        if batcher is None:
            backend = backend_class(spec.kind)(spec)
            batcher = MicroBatcher(backend, spec.max_batch_size, spec.batch_wait_ms)
            _batchers[spec.name] = batcher
        return batcher
