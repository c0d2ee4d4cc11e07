"""The built-in `echo` backend: no GPU, for probing and benchmarking the platform."""

from __future__ import annotations

import math
import time
from typing import Any

from workers.backends.base import Backend, JobContext, register


class EchoFailed(RuntimeError):
    code = "echo_failed"


@register
class EchoBackend(Backend):
    kind = "echo"
    serial = False  # no device: its sleeps overlap, as many as the worker has slots

    def setup(self) -> None:
        pass

    def predict(self, jobs: list[JobContext]) -> list[dict[str, Any] | BaseException]:
        return [self._one(job) for job in jobs]

    def _one(self, job: JobContext) -> dict[str, Any] | BaseException:
        sleep_s = float(job.input.get("sleep_s") or 0)
        deadline = time.monotonic() + sleep_s
        total, reported = math.ceil(sleep_s), 0
        # Sleep in short slices so cancel and timeout are seen within ~50 ms; report
        # progress once per second slept, so progress events can be probed too.
        while (left := deadline - time.monotonic()) > 0:
            job.check()
            time.sleep(min(0.05, left))
            slept = min(total, int(sleep_s - max(0.0, deadline - time.monotonic())))
            if slept > reported:
                reported = slept
                job.progress(reported, total)
        job.check()
        if job.input.get("fail"):
            return EchoFailed("echo job asked to fail")
        return {"value": job.input.get("value")}
