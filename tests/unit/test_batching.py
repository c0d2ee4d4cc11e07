"""The micro-batcher: concurrent compatible jobs share one predict call, results stay per job."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spool.registry import ModelSpec
from tests.unit.conftest import llm_spec
from tests.unit.recording import RecordingContext
from workers.backends.base import Backend, JobContext, ModelLoadError
from workers.batching import MicroBatcher, batcher_for


class GatedBackend(Backend):
    """Doubles `x`; batches by `group`. While the gate is shut, predict waits in it,
    so the test decides exactly which jobs are waiting when the next batch forms."""

    kind = "test.gated"

    def __init__(self, fail_setups: int = 0) -> None:
        super().__init__(ModelSpec(name="gated", kind="echo"))
        self.gate = threading.Event()
        self.in_predict = threading.Event()
        self.batches: list[list[Any]] = []
        self.setups = 0
        self.fail_setups = fail_setups

    def setup(self) -> None:
        self.setups += 1
        if self.setups <= self.fail_setups:
            raise ModelLoadError("weights are not there yet")

    def batch_key(self, job_input: dict[str, Any]) -> Hashable:
        if "x" not in job_input:
            raise ValueError("x is required")
        return job_input.get("group")

    def predict(self, jobs: list[JobContext]) -> list[dict[str, Any] | BaseException]:
        self.batches.append([job.input["x"] for job in jobs])
        self.in_predict.set()
        self.gate.wait(10)
        if any(job.input.get("explode") for job in jobs):
            raise RuntimeError("device lost")
        return [
            ValueError(f"odd {job.input['x']}")
            if job.input.get("fail")
            else {"y": 2 * job.input["x"]}
            for job in jobs
        ]


class Jobs:
    """Runs each job in its own thread, as the worker's thread pool does."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher
        self.results: dict[int, Any] = {}
        self.threads: list[threading.Thread] = []

    def submit(self, **job_input: Any) -> None:
        def run() -> None:
            try:
                self.results[job_input["x"]] = self.batcher.run(RecordingContext(job_input))
            except Exception as exc:
                self.results[job_input["x"]] = exc

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def wait_queued(self, n: int) -> None:
        deadline = time.monotonic() + 5
        while self.batcher.pending() < n:
            assert time.monotonic() < deadline, "jobs did not reach the batcher"
            time.sleep(0.001)

    def join(self) -> dict[int, Any]:
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive()
        return self.results


@pytest.fixture()
def gated() -> Iterator[tuple[GatedBackend, MicroBatcher, Jobs]]:
    backend = GatedBackend()
    batcher = MicroBatcher(backend, max_batch_size=4, wait_ms=1)
    yield backend, batcher, Jobs(batcher)
    backend.gate.set()
    batcher.close()


def _start_blocked(backend: GatedBackend, jobs: Jobs) -> None:
    """Submit job 0 and hold it inside predict, so the next jobs pile up."""
    jobs.submit(x=0)
    assert backend.in_predict.wait(5)


def test_groups_concurrent_compatible_jobs(gated: tuple[GatedBackend, MicroBatcher, Jobs]) -> None:
    backend, batcher, jobs = gated
    observed = _batch_size_sum()
    _start_blocked(backend, jobs)
    for x in range(1, 4):
        jobs.submit(x=x)
    jobs.wait_queued(3)
    backend.gate.set()
    assert jobs.join() == {x: {"y": 2 * x} for x in range(4)}
    assert backend.batches == [[0], [1, 2, 3]]
    assert list(batcher.batch_sizes) == [1, 3]
    assert _batch_size_sum() == observed + 4  # the spool_microbatch_size histogram


def _batch_size_sum() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("spool_microbatch_size_sum", {"model": "gated"})
    return value or 0.0


def _busy_seconds() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("spool_model_busy_seconds_total", {"model": "gated"})
    return value or 0.0


def test_counts_the_time_the_model_spends_in_predict(
    gated: tuple[GatedBackend, MicroBatcher, Jobs],
) -> None:
    """spool_model_busy_seconds: the time inside predict, failed batches too; not the
    time the batch thread waits for jobs."""
    backend, _, jobs = gated
    before = _busy_seconds()
    started = time.monotonic()
    _start_blocked(backend, jobs)
    time.sleep(0.2)  # the model is busy with job 0
    backend.gate.set()
    held = time.monotonic() - started  # an upper bound of the first batch's time
    jobs.join()
    time.sleep(0.3)  # idle: waiting for jobs is not busy
    jobs.submit(x=1, explode=True)  # a batch that raises is counted as well
    assert isinstance(jobs.join()[1], RuntimeError)
    busy = _busy_seconds() - before
    assert 0.2 <= busy < held + 0.15  # counting the idle 0.3 s too would pass that


def test_keeps_incompatible_jobs_apart_in_arrival_order(
    gated: tuple[GatedBackend, MicroBatcher, Jobs],
) -> None:
    backend, _, jobs = gated
    _start_blocked(backend, jobs)
    for x, group in ((1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "a")):
        jobs.submit(x=x, group=group)
        jobs.wait_queued(x)
    backend.gate.set()
    results = jobs.join()
    assert results == {x: {"y": 2 * x} for x in range(6)}
    assert backend.batches == [[0], [1, 3, 5], [2, 4]]


def test_batches_are_capped_at_max_batch_size(
    gated: tuple[GatedBackend, MicroBatcher, Jobs],
) -> None:
    backend, _, jobs = gated
    _start_blocked(backend, jobs)
    for x in range(1, 11):
        jobs.submit(x=x)
    jobs.wait_queued(10)
    backend.gate.set()
    jobs.join()
    assert [len(b) for b in backend.batches] == [1, 4, 4, 2]
    assert sorted(x for b in backend.batches for x in b) == list(range(11))


def test_each_caller_gets_its_own_result_or_exception(
    gated: tuple[GatedBackend, MicroBatcher, Jobs],
) -> None:
    backend, _, jobs = gated
    backend.gate.set()
    jobs.submit(x=1, fail=True)
    jobs.submit(x=2)
    results = jobs.join()
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd 1"
    assert results[2] == {"y": 4}


def test_a_failing_batch_fails_all_its_callers_and_the_next_batch_runs(
    gated: tuple[GatedBackend, MicroBatcher, Jobs],
) -> None:
    backend, _, jobs = gated
    _start_blocked(backend, jobs)
    jobs.submit(x=1, explode=True)
    jobs.submit(x=2)
    jobs.wait_queued(2)
    backend.gate.set()
    results = jobs.join()
    assert backend.batches == [[0], [1, 2]]
    assert isinstance(results[1], RuntimeError) and results[1] is results[2]
    assert results[0] == {"y": 0}
    later = Jobs(jobs.batcher)
    later.submit(x=3)
    assert later.join() == {3: {"y": 6}}


def test_setup_runs_lazily_once_and_is_retried_after_a_failure() -> None:
    backend = GatedBackend(fail_setups=1)
    backend.gate.set()
    batcher = MicroBatcher(backend, max_batch_size=4, wait_ms=0)
    assert backend.setups == 0
    with pytest.raises(ModelLoadError):
        batcher.run(RecordingContext({"x": 1}))
    assert batcher.run(RecordingContext({"x": 2})) == {"y": 4}
    assert batcher.run(RecordingContext({"x": 3})) == {"y": 6}
    assert backend.setups == 2
    batcher.close()


def test_bad_input_fails_in_the_caller_without_a_batch(
    gated: tuple[GatedBackend, MicroBatcher, Jobs],
) -> None:
    backend, batcher, _ = gated
    with pytest.raises(ValueError, match="x is required"):
        batcher.run(RecordingContext({}))
    assert backend.batches == [] and batcher.pending() == 0


def test_waits_for_late_jobs_up_to_wait_ms() -> None:
    backend = GatedBackend()
    backend.gate.set()
    batcher = MicroBatcher(backend, max_batch_size=8, wait_ms=300)
    jobs = Jobs(batcher)
    jobs.submit(x=1)
    time.sleep(0.05)  # well inside the window
    jobs.submit(x=2)
    jobs.join()
    assert backend.batches == [[1, 2]]
    started = time.monotonic()
    lone = Jobs(batcher)
    lone.submit(x=3)
    lone.join()
    assert 0.25 < time.monotonic() - started < 5  # a lone job waits out the window
    batcher.close()


def test_batcher_for_keeps_one_per_model() -> None:
    spec = ModelSpec(name="echo-batched", kind="echo", max_batch_size=3, batch_wait_ms=2)
    batcher = batcher_for(spec)
    assert batcher is batcher_for(spec)
    assert batcher.max_batch_size == 3 and batcher.wait_s == pytest.approx(0.002)
    assert batcher.run(RecordingContext({"value": [1, "a"]})) == {"value": [1, "a"]}
    assert batcher_for(ModelSpec(name="other", kind="echo")) is not batcher


def test_real_llm_jobs_share_a_forward_pass(tiny_models: dict[str, Path]) -> None:
    from workers.backends.llm import LLMBackend

    backend = LLMBackend(llm_spec(tiny_models["tiny-llm"]))
    batcher = MicroBatcher(backend, max_batch_size=16, wait_ms=200)
    inputs = [{"prompt": f"Hello {i}", "seed": i, "max_tokens": 8} for i in range(6)]
    start = threading.Barrier(len(inputs))
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        start.wait()
        results[i] = batcher.run(RecordingContext(dict(inputs[i])))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    batcher.close()
    assert sum(batcher.batch_sizes) == 6 and max(batcher.batch_sizes) >= 3
    for i, job_input in enumerate(inputs):
        assert results[i] == backend.predict([RecordingContext(dict(job_input))])[0]


class OneByOneBackend(Backend):
    """Hands the job with x=1 over at once, then holds the one with x=0 until the gate
    opens; jobs whose x is in `drop` get no result at all."""

    kind = "test.one-by-one"

    def __init__(self, drop: tuple[int, ...] = ()) -> None:
        super().__init__(ModelSpec(name="one-by-one", kind="echo"))
        self.gate = threading.Event()
        self.drop = drop

    def setup(self) -> None:
        pass

    def predict(self, jobs: list[JobContext]) -> list[dict[str, Any] | BaseException]:
        raise AssertionError("the batcher calls predict_each")

    def predict_each(self, jobs: list[JobContext], deliver: Any, admit: Any = None) -> None:
        assert len(jobs) == 2
        index = {job.input["x"]: i for i, job in enumerate(jobs)}
        if 1 not in self.drop:
            deliver(index[1], {"y": 1})
        self.gate.wait(10)
        if 0 not in self.drop:
            deliver(index[0], {"y": 0})


def _run_pair(backend: OneByOneBackend) -> tuple[MicroBatcher, Jobs]:
    # One batch of both: it gathers for up to 2 s, or until it has 2 jobs.
    batcher = MicroBatcher(backend, max_batch_size=2, wait_ms=2000)
    jobs = Jobs(batcher)
    jobs.submit(x=0)
    jobs.submit(x=1)
    return batcher, jobs


def test_a_job_handed_over_early_returns_while_its_batch_goes_on() -> None:
    backend = OneByOneBackend()
    batcher, jobs = _run_pair(backend)
    try:
        deadline = time.monotonic() + 5
        while 1 not in jobs.results:
            assert time.monotonic() < deadline, "job 1 was held until the batch ended"
            time.sleep(0.005)
        assert jobs.results == {1: {"y": 1}}  # job 0 is still in the batch
    finally:
        backend.gate.set()
    assert jobs.join() == {0: {"y": 0}, 1: {"y": 1}}
    batcher.close()


def test_a_job_the_backend_gave_no_result_fails_alone() -> None:
    backend = OneByOneBackend(drop=(0,))
    backend.gate.set()
    batcher, jobs = _run_pair(backend)
    results = jobs.join()
    batcher.close()
    assert results[1] == {"y": 1}
    assert isinstance(results[0], RuntimeError) and "no result for 1 of 2" in str(results[0])


class JoiningBackend(Backend):
    """A decode loop stand-in: runs until `stop`, taking in jobs through `admit` at every
    step, then hands every job over (doubled)."""

    kind = "test.joining"

    def __init__(self) -> None:
        super().__init__(ModelSpec(name="joining", kind="echo"))
        self.stop = threading.Event()
        self.running = 0
        self.batches: list[list[int]] = []

    def setup(self) -> None:
        pass

    def batch_key(self, job_input: dict[str, Any]) -> Hashable:
        return job_input.get("group")

    def predict(self, jobs: list[JobContext]) -> list[dict[str, Any] | BaseException]:
        raise AssertionError("the batcher calls predict_each")

    def predict_each(self, jobs: list[JobContext], deliver: Any, admit: Any = None) -> None:
        rows = list(enumerate(jobs))
        while True:
            self.running = len(rows)
            if self.stop.is_set():
                break
            rows += admit(len(rows))
            time.sleep(0.002)
        self.batches.append(sorted(ctx.input["x"] for _, ctx in rows))
        for index, ctx in rows:
            deliver(index, {"y": 2 * ctx.input["x"]})


def _joined(model: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("spool_microbatch_joined_total", {"model": model}) or 0.0


def test_compatible_jobs_join_a_running_batch_up_to_its_size() -> None:
    backend = JoiningBackend()
    batcher = MicroBatcher(backend, max_batch_size=3, wait_ms=1)
    jobs = Jobs(batcher)
    joined = _joined("joining")
    try:
        jobs.submit(x=0)
        deadline = time.monotonic() + 5
        while backend.running != 1:
            assert time.monotonic() < deadline, "the batch did not start"
            time.sleep(0.002)
        for x, group in ((1, None), (2, "b"), (3, None), (4, None)):
            jobs.submit(x=x, group=group)
        while backend.running != 3:
            assert time.monotonic() < deadline, "jobs did not join the running batch"
            time.sleep(0.002)
        time.sleep(0.05)  # more steps: still no room for job 4, and job 2 does not fit
        assert backend.running == 3 and batcher.pending() == 2
    finally:
        backend.stop.set()
    assert jobs.join() == {x: {"y": 2 * x} for x in range(5)}
    batcher.close()
    # 0 started it and two of 1, 3, 4 joined (2 is of another group); the rest ran later.
    assert list(batcher.batch_sizes) == [3, 1, 1]
    assert backend.batches[0][0] == 0 and 2 not in backend.batches[0]
    assert _joined("joining") == joined + 2
