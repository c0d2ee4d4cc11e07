"""The inference-backend interface (cog's lifecycle, Redash's registry).

`setup()` loads weights once per process; `predict()` runs a batch of compatible
jobs and returns one result (or exception) per job, in order. Per-job progress,
tokens and cancel go through each job's `JobContext`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, Protocol

from spool.registry import ModelSpec


class JobCanceled(Exception):
    """The job's cancel flag was seen at a step or token boundary."""


class JobTimedOut(Exception):
    """The job ran past its timeout_s."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded (missing files, out of memory, bad config)."""


class OutOfMemory(RuntimeError):
    """The job does not fit the device's memory even alone (its job fails with this code)."""

    code = "out_of_memory"


class LearnedCaps:
    """Batch sizes learned from running out of device memory, per key (an image shape;
    None for the model as a whole), each forgotten `ttl_s` after it was set: memory
    freed since (another process on the GPU gone, a fragmented allocator emptied) is
    used again, for the price of one refused call per `ttl_s` where the cap was right."""

    TTL_S = 600.0

    def __init__(self, ttl_s: float = TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self._clock = ttl_s, clock
        self._caps: dict[Hashable, tuple[int, float]] = {}
        self._lock = threading.Lock()  # the micro-batcher reads while the model thread sets

    def get(self, key: Hashable = None) -> int | None:
        with self._lock:
            found = self._caps.get(key)
            if found is None:
                return None
            if self._clock() - found[1] >= self.ttl_s:
                del self._caps[key]
                return None
            return found[0]

    def lowest(self) -> int | None:
        """The smallest cap in force, whatever its key; None while none is."""
        with self._lock:
            now = self._clock()
            live = [cap for cap, since in self._caps.values() if now - since < self.ttl_s]
        return min(live, default=None)

    def lower(self, cap: int, key: Hashable = None) -> bool:
        """Cap `key`'s batches at `cap` from now on (a cap in force is never raised);
        True when that lowered it."""
        with self._lock:
            now, found = self._clock(), self._caps.get(key)
            if found is not None and now - found[1] < self.ttl_s and found[0] <= cap:
                return False
            self._caps[key] = (max(1, cap), now)
        return True


class JobContext(Protocol):
    """What a backend may do for one job of a batch."""

    job_id: str
    input: dict[str, Any]

    def progress(self, current: int, total: int) -> None: ...

    def token(self, text: str) -> None: ...

    def canceled(self) -> bool: ...

    def check(self) -> None:
        """Raise JobCanceled / JobTimedOut if the job must stop now."""
        ...

    def save_artifact(self, name: str, data: bytes, content_type: str) -> str:
        """Store bytes for this job; returns the public URL of the artifact."""
        ...


Result = dict[str, Any] | BaseException
Deliver = Callable[[int, Result], None]  # (index of the job in the batch, its result)
Admit = Callable[[int], list[tuple[int, JobContext]]]  # rows running → jobs joining


class Backend(ABC):
    kind: ClassVar[str]
    # A model on a device runs one batch at a time per process (through its micro-batcher,
    # even at max_batch_size 1): threads that each run their own forward passes on one
    # device only contend for it (and for the GIL) and multiply its activation memory.
    serial: ClassVar[bool] = True

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        # Batch sizes below the registry's max_batch_size, learned where a batch of the
        # model ran out of device memory.
        self.caps = LearnedCaps()

    @property
    def batch_limit(self) -> int | None:
        """Jobs per batch below max_batch_size, for now (the micro-batcher forms and fills
        batches up to it); None while no batch of the model ran out of memory lately."""
        return self.caps.get(None)

    @abstractmethod
    def setup(self) -> None:
        """Load weights once per process (called before the first predict)."""

    def batch_key(self, job_input: dict[str, Any]) -> Hashable:
        """Jobs with equal keys may run in one batch (same shape-setting parameters)."""
        return None

    @abstractmethod
    def predict(self, jobs: list[JobContext]) -> list[dict[str, Any] | BaseException]:
        """Run a batch; one output dict or exception per job, in order."""

    def predict_each(
        self, jobs: list[JobContext], deliver: Deliver, admit: Admit | None = None
    ) -> None:
        """Run a batch, handing each job's result to `deliver(index, result)` as soon as it
        is known. By default all at once, after `predict`; a backend whose jobs end at
        different times (texts of different lengths) hands each over when it ends, so that
        no job waits for the longest one of its batch.

        `admit(running)`: for a backend that can take jobs into a batch already running (a
        decode loop), the jobs that arrived since, with their indices, to fill it up from
        `running` rows; they are delivered like the others. The default takes none."""
        results = self.predict(jobs)
        if len(results) != len(jobs):
            raise RuntimeError(f"backend returned {len(results)} results for {len(jobs)} jobs")
        for index, result in enumerate(results):
            deliver(index, result)


_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.kind] = cls
    return cls


def backend_class(kind: str) -> type[Backend]:
    """Prefer workers.backends.backend_class, which also imports the GPU backends."""
    from workers.backends import backend_class as _load

    return _load(kind)
