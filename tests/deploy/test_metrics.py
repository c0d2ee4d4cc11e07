"""spool/metrics.py: multiprocess aggregation, scrape-time collectors, GPU sampling."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from spool import metrics


def _python(code: str, env: dict[str, str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def _sample(body: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    return None


@pytest.fixture
def mp_env(tmp_path: Path) -> dict[str, str]:
    """Environment for child processes in multiprocess mode (set before they import)."""
    directory = tmp_path / "prom"
    directory.mkdir()
    return {**os.environ, metrics.MULTIPROC_ENV: str(directory)}


INCREMENT = """
    import sys
    from spool import metrics
    assert metrics.multiprocess_active()
    metrics.JOBS_SUBMITTED.labels("echo", "echo").inc(int(sys.argv[1]))
    metrics.QUEUE_WAIT.labels("echo").observe(0.2)
    metrics.HTTP_IN_FLIGHT.inc()
    print(__import__("os").getpid())
"""

RENDER = """
    import sys
    from spool import metrics
    body, ctype = metrics.render()
    sys.stdout.write(ctype + "\\n" + body.decode())
"""


def _increment(env: dict[str, str], n: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(INCREMENT), str(n)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_counters_from_two_processes_add_up(mp_env: dict[str, str]) -> None:
    first, second = _increment(mp_env, 2), _increment(mp_env, 3)
    _finish(first), _finish(second)

    ctype, _, body = _finish(_python(RENDER, mp_env)).partition("\n")
    assert ctype.startswith("text/plain; version=0.0.4")
    labels = {"kind": "echo", "model": "echo"}
    assert _sample(body, "spool_jobs_submitted_total", labels) == 5.0
    assert _sample(body, "spool_job_queue_wait_seconds_count", {"model": "echo"}) == 2.0
    assert (
        _sample(body, "spool_job_queue_wait_seconds_bucket", {"model": "echo", "le": "0.5"}) == 2.0
    )


def test_live_gauges_forget_dead_processes(mp_env: dict[str, str]) -> None:
    pids = [int(_finish(_increment(mp_env, 1))) for _ in range(2)]
    body = _finish(_python(RENDER, mp_env)).partition("\n")[2]
    # livesum: the in-flight gauges of both processes are summed, without a pid label.
    assert _sample(body, "spool_http_requests_in_flight") == 2.0

    mark = f"from spool import metrics; metrics.mark_process_dead({pids[0]})"
    _finish(_python(mark, mp_env))
    body = _finish(_python(RENDER, mp_env)).partition("\n")[2]
    assert _sample(body, "spool_http_requests_in_flight") == 1.0
    # Counters keep what dead processes counted.
    assert _sample(body, "spool_jobs_submitted_total", {"kind": "echo", "model": "echo"}) == 2.0


def test_worker_metrics_server_aggregates_pool_processes(mp_env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _python(
        f"""
        import sys, time
        from spool import metrics
        assert metrics.start_worker_metrics_server({port}, addr="127.0.0.1")
        assert not metrics.start_worker_metrics_server(0)
        metrics.MICROBATCH_SIZE.labels("tiny-sd").observe(4)
        print("ready", flush=True)
        sys.stdin.read()
        """,
        mp_env,
        stdin=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        # Another process of the same container (a pool child) records too.
        child = "from spool import metrics; metrics.MICROBATCH_SIZE.labels('tiny-sd').observe(8)"
        _finish(_python(child, mp_env))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert _sample(body, "spool_microbatch_size_count", {"model": "tiny-sd"}) == 2.0
        assert _sample(body, "spool_microbatch_size_sum", {"model": "tiny-sd"}) == 12.0
    finally:
        server.communicate(input="", timeout=30)


def _no_multiproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first, so that monkeypatch restores the variable's absence afterwards even
    # though setup_multiproc_dir() writes os.environ itself.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "")
    monkeypatch.delenv(metrics.MULTIPROC_ENV)


def test_setup_multiproc_dir_clears_stale_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_multiproc_env(monkeypatch)
    directory = tmp_path / "a" / "b"
    assert metrics.setup_multiproc_dir(directory) == directory
    assert directory.is_dir() and os.environ[metrics.MULTIPROC_ENV] == str(directory)
    (directory / "counter_123.db").write_bytes(b"stale")
    (directory / "README").write_text("kept")
    metrics.setup_multiproc_dir(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["README"]


def test_registry_for_scrape_by_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_multiproc_env(monkeypatch)
    assert metrics.registry_for_scrape() is REGISTRY
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    registry = metrics.registry_for_scrape()
    assert isinstance(registry, CollectorRegistry) and registry is not REGISTRY
    # mark_process_dead is harmless for an unknown pid.
    metrics.mark_process_dead(999_999)


# --- LiveCollector ------------------------------------------------------------------


def _families(collector: metrics.LiveCollector) -> dict[str, dict[tuple[str, ...], float]]:
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for family in collector.collect():
        out[family.name] = {tuple(s.labels.values()): s.value for s in family.samples}
    return out


def test_live_collector_reports_sources() -> None:
    collector = metrics.LiveCollector(
        {
            "jobs_queued": lambda: {"tiny-sd": 4, "echo": 0},
            "workers_online": lambda: {"tiny-sd": 2},
            "queue_length": lambda: {"spool.model.tiny-sd": 3},
        }
    )
    got = _families(collector)
    assert got["spool_jobs_queued"] == {("tiny-sd",): 4.0, ("echo",): 0.0}
    assert got["spool_workers_online"] == {("tiny-sd",): 2.0}
    assert got["spool_queue_length"] == {("spool.model.tiny-sd",): 3.0}
    assert got["spool_live_source_up"] == {
        ("jobs_queued",): 1.0,
        ("workers_online",): 1.0,
        ("queue_length",): 1.0,
    }


def test_live_collector_never_blocks_long_and_reports_failures() -> None:
    release = threading.Event()
    calls = {"slow": 0}

    def slow() -> dict[str, float]:
        calls["slow"] += 1
        release.wait(30)
        return {"tiny-sd": 1}

    def broken() -> dict[str, float]:
        raise ConnectionError("redis down")

    collector = metrics.LiveCollector(
        {"jobs_running": slow, "queue_length": broken, "jobs_queued": lambda: {"echo": 1}},
        timeout_s=0.2,
        cache_s=0,
    )
    try:
        started = time.monotonic()
        got = _families(collector)
        assert time.monotonic() - started < 2
        assert got["spool_live_source_up"] == {
            ("jobs_running",): 0.0,
            ("queue_length",): 0.0,
            ("jobs_queued",): 1.0,
        }
        assert got["spool_jobs_running"] == {} and got["spool_jobs_queued"] == {("echo",): 1.0}
        # A source still stuck from the previous scrape is not started a second time.
        _families(collector)
        assert calls["slow"] == 1
    finally:
        release.set()


def test_live_collector_logs_a_source_going_down_once(caplog: pytest.LogCaptureFixture) -> None:
    answers: list[object] = [["not", "a", "mapping"], {"echo": "NaN?"}, {"echo": 2}]

    def flaky() -> object:
        return answers.pop(0)

    collector = metrics.LiveCollector({"jobs_queued": flaky}, cache_s=0)  # type: ignore[dict-item]
    with caplog.at_level("INFO", logger="spool.metrics"):
        ups = [_families(collector)["spool_live_source_up"][("jobs_queued",)] for _ in range(3)]
    assert ups == [0.0, 0.0, 1.0]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "is down" in m]) == 1
    assert any("answers again" in m for m in messages)


def test_live_collector_caches_between_scrapes() -> None:
    calls: list[int] = []

    def queued() -> dict[str, float]:
        calls.append(1)
        return {"echo": len(calls)}

    collector = metrics.LiveCollector({"jobs_queued": queued}, cache_s=60)
    first, second = _families(collector), _families(collector)
    assert first == second and len(calls) == 1


def test_live_collector_checks_names_and_describe_is_free() -> None:
    with pytest.raises(ValueError, match="unknown live sources"):
        metrics.LiveCollector({"jobs_queud": dict})

    def forbidden() -> dict[str, float]:
        raise AssertionError("describe() must not query")

    collector = metrics.LiveCollector({"jobs_queued": forbidden})
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)  # calls describe(), not collect()
    assert [f.name for f in collector.describe()] == ["spool_jobs_queued", "spool_live_source_up"]


def test_live_collector_in_multiprocess_scrape(mp_env: dict[str, str]) -> None:
    code = """
        import sys
        from spool import metrics
        metrics.add_scrape_collector(metrics.LiveCollector({"workers_online": lambda: {"x": 7}}))
        sys.stdout.write(metrics.render()[0].decode())
    """
    body = _finish(_python(code, mp_env))
    assert _sample(body, "spool_workers_online", {"model": "x"}) == 7.0


# --- helpers and GPU sampling (single-process, this test process) --------------------


def _value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    if metrics.multiprocess_active():
        pytest.skip("this process records into multiprocess files")
    _no_multiproc_env(monkeypatch)


@pytest.mark.usefixtures("single_process")
def test_recording_helpers() -> None:
    before = {
        "req": _value(
            "spool_http_requests_total", {"endpoint": "/v1/jobs", "method": "POST", "status": "202"}
        ),
        "started": _value("spool_jobs_started_total", {"kind": "echo", "model": "echo"}),
        "attempts": _value("spool_job_attempts_total", {"model": "echo"}),
        "failed": _value(
            "spool_jobs_finished_total", {"kind": "echo", "model": "echo", "status": "failed"}
        ),
        "runs": _value("spool_job_run_seconds_count", {"model": "echo"}),
    }
    metrics.observe_request("/v1/jobs", "POST", 202, 0.01)
    metrics.observe_job_started("echo", "echo", queue_wait_s=-1.0)  # clock skew clamps to 0
    metrics.observe_job_finished("echo", "echo", "failed", run_s=0.5)
    metrics.observe_job_finished("echo", "echo", "failed", run_s=None)
    assert (
        _value(
            "spool_http_requests_total", {"endpoint": "/v1/jobs", "method": "POST", "status": "202"}
        )
        == before["req"] + 1
    )
    assert _value("spool_jobs_started_total", {"kind": "echo", "model": "echo"}) == (
        before["started"] + 1
    )
    assert _value("spool_job_attempts_total", {"model": "echo"}) == before["attempts"] + 1
    assert (
        _value("spool_jobs_finished_total", {"kind": "echo", "model": "echo", "status": "failed"})
        == before["failed"] + 2
    )
    assert _value("spool_job_run_seconds_count", {"model": "echo"}) == before["runs"] + 1


class _FakeCuda:
    """The four torch.cuda functions sample_gpu_memory() uses."""

    def __init__(self) -> None:
        self.initialized = False

    def is_initialized(self) -> bool:
        return self.initialized

    def device_count(self) -> int:
        return 2

    def memory_allocated(self, index: int) -> int:
        return 1000 * (index + 1)

    def memory_reserved(self, index: int) -> int:
        return 4000 * (index + 1)


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> _FakeCuda:
    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    return cuda


@pytest.mark.usefixtures("single_process")
def test_gpu_memory_is_read_only_where_cuda_is_in_use(fake_torch: _FakeCuda) -> None:
    metrics.GPU_MEMORY_ALLOCATED.clear()
    metrics.sample_gpu_memory()  # CUDA not initialized here: nothing read, nothing set
    assert (
        REGISTRY.get_sample_value("spool_gpu_memory_allocated_bytes", {"device": "cuda:0"}) is None
    )

    fake_torch.initialized = True
    metrics.observe_model_loaded("tiny-sd", 1.5)
    assert _value("spool_gpu_memory_allocated_bytes", {"device": "cuda:1"}) == 2000
    assert _value("spool_gpu_memory_reserved_bytes", {"device": "cuda:0"}) == 4000
    assert _value("spool_models_loaded", {"model": "tiny-sd"}) == 1
    body = metrics.render()[0].decode()
    assert 'spool_gpu_memory_reserved_bytes{device="cuda:1"} 8000.0' in body
    metrics.observe_model_unloaded("tiny-sd")
    assert _value("spool_models_loaded", {"model": "tiny-sd"}) == 0


def test_gpu_sampling_without_torch_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    metrics.sample_gpu_memory()  # must not import torch
    assert "torch" not in sys.modules


def test_docstring_table_lists_every_metric() -> None:
    doc = metrics.__doc__ or ""
    missing = {name for name in metrics.ALL_METRIC_NAMES if f"| {name} " not in doc}
    assert not missing, f"add {sorted(missing)} to the table in spool/metrics.py"
