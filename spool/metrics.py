"""Every Prometheus metric of Spool, defined once (prometheus-client).

| name                               | type      | labels              | meaning                   |
| ---------------------------------- | --------- | ------------------- | ------------------------- |
| spool_http_requests_total          | counter   | endpoint, method,   | API requests answered     |
|                                    |           | status              | (endpoint = URL rule)     |
| spool_http_request_duration_seconds | histogram | endpoint           | API latency               |
| spool_http_requests_in_flight      | gauge     |                     | requests being served     |
| spool_jobs_submitted_total         | counter   | kind, model         | jobs accepted (committed) |
| spool_jobs_started_total           | counter   | kind, model         | claims by a worker        |
| spool_jobs_finished_total          | counter   | kind, model, status | jobs at a final status    |
| spool_job_queue_wait_seconds       | histogram | model               | submit/re-enqueue → claim |
| spool_job_run_seconds              | histogram | model               | claim → end of the run    |
| spool_job_attempts_total           | counter   | model               | claims, retries included  |
| spool_job_retries_total            | counter   | model, reason       | sweeper re-sends          |
| spool_jobs_canceled_total          | counter   | model, stage        | cancels (queued/running)  |
| spool_jobs_expired_total           | counter   | model               | ttl_s ran out in queue    |
| spool_webhook_deliveries_total     | counter   | event, outcome      | webhook attempts          |
| spool_webhook_delivery_seconds     | histogram |                     | one webhook HTTP attempt  |
| spool_microbatch_size              | histogram | model               | jobs starting a batch     |
| spool_microbatch_joined_total      | counter   | model               | jobs joining a running one|
| spool_model_busy_seconds_total     | counter   | model               | seconds running batches   |
| spool_model_out_of_memory_total    | counter   | model               | calls out of GPU memory   |
| spool_model_batch_limit            | gauge     | model               | largest batch it runs now |
| spool_model_steps_total            | counter   | model               | text model forward passes |
| spool_model_step_rows_total        | counter   | model               | jobs in those passes      |
| spool_model_load_seconds           | histogram | model               | model load time           |
| spool_models_loaded                | gauge     | model               | processes holding it warm |
| spool_gpu_memory_allocated_bytes   | gauge     | device              | torch.cuda allocated      |
| spool_gpu_memory_reserved_bytes    | gauge     | device              | torch.cuda reserved       |
| spool_queue_length                 | gauge     | queue               | Redis list length (live)  |
| spool_jobs_queued                  | gauge     | model               | queued in PG (live)       |
| spool_jobs_running                 | gauge     | model               | running in PG (live)      |
| spool_workers_online               | gauge     | model               | consuming workers (live)  |
| spool_live_source_up               | gauge     | source              | live source answered      |

Label values: status = succeeded | failed | canceled | expired; reason = worker_lost |
lost_message; stage = queued | running; outcome = delivered | retrying | gave_up | gone
(410) | refused (SSRF); device = cuda:N. GPU gauges and spool_models_loaded sum over the
processes of one scrape target.

The last five are read when Prometheus scrapes, by `LiveCollector`, so every API
replica reports the same global numbers: aggregate them with `max`, never `sum`.

Multiprocess mode (gunicorn workers, a prefork Celery pool): prometheus-client
picks its value store when it is first imported, from `PROMETHEUS_MULTIPROC_DIR`.
That variable must therefore be in the environment before any process that
records metrics starts: `setup_multiproc_dir()` in the parent before it execs
gunicorn or forks, and `mark_process_dead(pid)` from gunicorn's `child_exit`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
    values,
)
from prometheus_client import multiprocess as _mp
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from spool import gpus

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# generate_latest() writes the 0.0.4 text format whatever the library version.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

if os.environ.get(MULTIPROC_ENV):
    # Unlabelled metrics open their mmap file as soon as they are defined (below): a
    # missing directory would make importing this module fail in every process that
    # has the variable but was not started through setup_multiproc_dir() (beat, CLI).
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)

# --- API -----------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "spool_http_requests",
    "API requests answered, by URL rule, method and status code.",
    ["endpoint", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "spool_http_request_duration_seconds",
    "API request latency by URL rule.",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
HTTP_IN_FLIGHT = Gauge(
    "spool_http_requests_in_flight",
    "API requests being served now.",
    multiprocess_mode="livesum",  # a dead gunicorn worker serves nothing
)

# --- Jobs ----------------------------------------------------------------------------------

JOBS_SUBMITTED = Counter("spool_jobs_submitted", "Jobs accepted (committed).", ["kind", "model"])
JOBS_STARTED = Counter(
    "spool_jobs_started", "Jobs claimed by a worker, each attempt.", ["kind", "model"]
)
JOBS_FINISHED = Counter(
    "spool_jobs_finished",
    "Jobs that reached a final status.",
    ["kind", "model", "status"],
)
QUEUE_WAIT = Histogram(
    "spool_job_queue_wait_seconds",
    "Time from submit (or re-enqueue) to the claim by a worker.",
    ["model"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 1800, 3600, 14400, 86400),
)
RUN_TIME = Histogram(
    "spool_job_run_seconds",
    "Time from the claim to the end of the run.",
    ["model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
JOB_ATTEMPTS = Counter("spool_job_attempts", "Claims of a job by a worker.", ["model"])
JOB_RETRIES = Counter(
    "spool_job_retries",
    "Jobs sent again by the sweeper (worker_lost: lease expired; lost_message).",
    ["model", "reason"],
)
JOBS_CANCELED = Counter(
    "spool_jobs_canceled", "Cancels, by the job's status when asked.", ["model", "stage"]
)
JOBS_EXPIRED = Counter(
    "spool_jobs_expired", "Queued jobs whose ttl_s ran out before they started.", ["model"]
)

# --- Webhooks ------------------------------------------------------------------------------

WEBHOOK_DELIVERIES = Counter(
    "spool_webhook_deliveries",
    "Webhook attempts by event type and outcome (delivered, retrying, gave_up, gone, refused).",
    ["event", "outcome"],
)
WEBHOOK_DURATION = Histogram(
    "spool_webhook_delivery_seconds",
    "Duration of one webhook HTTP attempt.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)

# --- Workers -------------------------------------------------------------------------------

MICROBATCH_SIZE = Histogram(
    "spool_microbatch_size",
    "Jobs a micro-batch started with (jobs joining it later: spool_microbatch_joined).",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
MICROBATCH_JOINED = Counter(
    "spool_microbatch_joined",
    "Jobs that joined a micro-batch already running (a text model's decode loop takes "
    "them between two steps); spool_microbatch_size counts those it started with.",
    ["model"],
)
MODEL_BUSY = Counter(
    "spool_model_busy_seconds",
    "Wall seconds a model spent running micro-batches. Its rate is how busy the model "
    "kept its device: 1 per worker process is never idle; less, it waited for jobs.",
    ["model"],
)
MODEL_OUT_OF_MEMORY = Counter(
    "spool_model_out_of_memory",
    "Model calls that ran out of device memory (the batch then goes on in halves, and "
    "later batches at the lowered size for a while: spool_model_batch_limit).",
    ["model"],
)
MODEL_BATCH_LIMIT = Gauge(
    "spool_model_batch_limit",
    "The largest batch the model runs now: its max_batch_size, or less for a while after "
    "a batch ran out of device memory (an image model: its most lowered size); the lowest "
    "of this target's processes.",
    ["model"],
    multiprocess_mode="livemin",
)
MODEL_STEPS = Counter(
    "spool_model_steps",
    "Forward passes of a text model (a prompt's prefill or one decode step of its batch).",
    ["model"],
)
MODEL_STEP_ROWS = Counter(
    "spool_model_step_rows",
    "Jobs in those forward passes: over spool_model_steps_total, the batch size a text "
    "model really ran (jobs join and leave a decode loop between steps).",
    ["model"],
)
MODEL_LOAD_TIME = Histogram(
    "spool_model_load_seconds",
    "Time to load a model into a worker process.",
    ["model"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
MODELS_LOADED = Gauge(
    "spool_models_loaded",
    "Worker processes holding the model warm.",
    ["model"],
    multiprocess_mode="livesum",
)
GPU_MEMORY_ALLOCATED = Gauge(
    "spool_gpu_memory_allocated_bytes",
    "torch.cuda.memory_allocated per device, summed over this target's processes.",
    ["device"],
    multiprocess_mode="livesum",  # processes sharing a GPU add up; dead ones hold nothing
)
GPU_MEMORY_RESERVED = Gauge(
    "spool_gpu_memory_reserved_bytes",
    "torch.cuda.memory_reserved per device, summed over this target's processes.",
    ["device"],
    multiprocess_mode="livesum",
)

# --- Scrape-time gauges (LiveCollector) ----------------------------------------------------

LiveSource = Callable[[], Mapping[str, float]]
"""A function returning {label value: number}, e.g. {"tiny-sd": 3, "echo": 0}."""

# source key -> (metric name, help, label name)
LIVE_METRICS: dict[str, tuple[str, str, str]] = {
    "queue_length": (
        "spool_queue_length",
        "Messages in a Redis queue list, all priority lists summed.",
        "queue",
    ),
    "jobs_queued": ("spool_jobs_queued", "Jobs queued in PostgreSQL.", "model"),
    "jobs_running": ("spool_jobs_running", "Jobs running or canceling in PostgreSQL.", "model"),
    "workers_online": (
        "spool_workers_online",
        "Worker processes consuming the model's queue.",
        "model",
    ),
}
LIVE_SOURCE_UP = "spool_live_source_up"


class LiveCollector:
    """Gauges read from PostgreSQL and Redis when Prometheus scrapes.

    `sources` maps keys of LIVE_METRICS to functions. All run concurrently; a source
    that has not answered within `timeout_s` is reported down (and left running,
    never started twice), so /metrics answers in about `timeout_s` at worst. Results
    are reused for `cache_s` so several scrapers do not multiply database queries.
    The functions should still set their own short socket/statement timeouts.
    """

    def __init__(
        self,
        sources: Mapping[str, LiveSource],
        *,
        timeout_s: float = 1.5,
        cache_s: float = 5.0,
    ) -> None:
        unknown = set(sources) - set(LIVE_METRICS)
        if unknown:
            raise ValueError(
                f"unknown live sources {sorted(unknown)}; known: {sorted(LIVE_METRICS)}"
            )
        self._sources = dict(sources)
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, len(self._sources)), thread_name_prefix="spool-live-metrics"
        )
        self._pending: dict[str, Future[Mapping[str, float]]] = {}
        self._results: dict[str, dict[str, float] | None] = {}
        self._down: set[str] = set()
        self._read_at = float("-inf")

    def _refresh(self) -> None:
        for key, fn in self._sources.items():
            if key not in self._pending or self._pending[key].done():
                self._pending[key] = self._pool.submit(fn)
        wait_futures(list(self._pending.values()), timeout=self._timeout_s)
        for key, fut in self._pending.items():
            self._results[key] = self._read(key, fut)
        self._read_at = time.monotonic()

    def _read(self, key: str, fut: Future[Mapping[str, float]]) -> dict[str, float] | None:
        values_: dict[str, float] | None = None
        error: object = None
        if not fut.done():
            error = f"no answer within {self._timeout_s} s"
        elif fut.exception() is not None:
            error = fut.exception()
        else:
            try:
                values_ = {str(k): float(v) for k, v in fut.result().items()}
            except (TypeError, ValueError, AttributeError) as exc:  # not {label: number}
                error = exc
        # Logged on the way down and up only: a scrape every 15 s must not flood the log.
        if values_ is None:
            if key not in self._down:
                log.warning("live metric source %s is down: %s", key, error)
                self._down.add(key)
        elif key in self._down:
            log.info("live metric source %s answers again", key)
            self._down.discard(key)
        return values_

    def _families(self, results: Mapping[str, dict[str, float] | None]) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            LIVE_SOURCE_UP, "1 if the scrape-time source answered in time.", labels=["source"]
        )
        for key in self._sources:
            name, doc, label = LIVE_METRICS[key]
            family = GaugeMetricFamily(name, doc, labels=[label])
            values_ = results.get(key)
            for label_value, value in (values_ or {}).items():
                family.add_metric([label_value], value)
            up.add_metric([key], 0.0 if values_ is None else 1.0)
            yield family
        yield up

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if time.monotonic() - self._read_at >= self._cache_s:
                self._refresh()
            results = dict(self._results)
        yield from self._families(results)

    def describe(self) -> Iterator[Metric]:
        # Without this, registering in an auto-describing registry would call collect()
        # (and so PostgreSQL and Redis) at registration time.
        yield from self._families({})


# --- Names ---------------------------------------------------------------------------------

_DEFINED: tuple[Counter | Gauge | Histogram, ...] = (
    HTTP_REQUESTS,
    HTTP_LATENCY,
    HTTP_IN_FLIGHT,
    JOBS_SUBMITTED,
    JOBS_STARTED,
    JOBS_FINISHED,
    QUEUE_WAIT,
    RUN_TIME,
    JOB_ATTEMPTS,
    JOB_RETRIES,
    JOBS_CANCELED,
    JOBS_EXPIRED,
    WEBHOOK_DELIVERIES,
    WEBHOOK_DURATION,
    MICROBATCH_SIZE,
    MICROBATCH_JOINED,
    MODEL_BUSY,
    MODEL_OUT_OF_MEMORY,
    MODEL_BATCH_LIMIT,
    MODEL_STEPS,
    MODEL_STEP_ROWS,
    MODEL_LOAD_TIME,
    MODELS_LOADED,
    GPU_MEMORY_ALLOCATED,
    GPU_MEMORY_RESERVED,
)


def _exposed_name(metric: Counter | Gauge | Histogram) -> str:
    # The text format names a counter family with its _total suffix; histograms
    # add _bucket/_sum/_count to the family name, which PromQL users add themselves.
    (family,) = metric.describe()
    return family.name + "_total" if family.type == "counter" else family.name


ALL_METRIC_NAMES: frozenset[str] = frozenset(
    [_exposed_name(m) for m in _DEFINED]
    + [name for name, _doc, _label in LIVE_METRICS.values()]
    + [LIVE_SOURCE_UP]
)
"""Family names as exposed (counters with _total; histograms without their suffixes)."""

# --- Recording helpers (several metrics that always move together) -------------------------


def observe_request(endpoint: str, method: str, status: int, seconds: float) -> None:
    """Count one API request and its latency (call once per request, after the response).

    `endpoint` is the URL rule (`/v1/jobs/<job_id>`), never the raw path, so label values
    stay few; requests that long-polled (`?wait=`, `Prefer: wait`) add " wait" to it so
    that latency alerts can leave them out.
    """
    HTTP_REQUESTS.labels(endpoint, method, str(status)).inc()
    HTTP_LATENCY.labels(endpoint).observe(seconds)


def observe_job_started(kind: str, model: str, queue_wait_s: float) -> None:
    """A worker claimed a job (every attempt, retries included)."""
    JOBS_STARTED.labels(kind, model).inc()
    JOB_ATTEMPTS.labels(model).inc()
    QUEUE_WAIT.labels(model).observe(max(0.0, queue_wait_s))


def observe_job_finished(kind: str, model: str, status: str, run_s: float | None) -> None:
    """A job reached a final status; `run_s` is None when it never ran (expired, or canceled
    while queued)."""
    JOBS_FINISHED.labels(kind, model, status).inc()
    if run_s is not None:
        RUN_TIME.labels(model).observe(max(0.0, run_s))


def observe_model_loaded(model: str, seconds: float) -> None:
    """A model is warm in this process; also samples GPU memory right after the load."""
    MODEL_LOAD_TIME.labels(model).observe(seconds)
    MODELS_LOADED.labels(model).set(1)
    sample_gpu_memory()


def observe_model_unloaded(model: str) -> None:
    """The model left this process (evicted from the warm cache)."""
    MODELS_LOADED.labels(model).set(0)
    sample_gpu_memory()


def sample_gpu_memory() -> None:
    """Update the GPU memory gauges from torch.cuda in *this* process.

    Lazy on purpose: never imports torch and never initializes CUDA (doing so in a
    parent before fork breaks CUDA in the children); reads only when this process
    already uses CUDA. Called at scrape time by render() and the worker metrics
    server; a prefork child running inference should call it after each batch,
    since the scraping process is not the one holding the GPU.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    cuda = torch.cuda
    if not cuda.is_initialized():
        return
    # Under CUDA_VISIBLE_DEVICES (a worker process per GPU) cuda:0 is whichever GPU the
    # process was given: label it by the host's name for it, so processes add up per GPU.
    names = gpus.visible() or []
    for index in range(cuda.device_count()):
        device = f"cuda:{names[index] if index < len(names) else index}"
        GPU_MEMORY_ALLOCATED.labels(device).set(cuda.memory_allocated(index))
        GPU_MEMORY_RESERVED.labels(device).set(cuda.memory_reserved(index))


# --- Multiprocess plumbing and exposition ---------------------------------------------------

_extra_collectors: list[LiveCollector] = []
_registered_in_default: set[int] = set()
_extra_lock = threading.Lock()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def multiprocess_active() -> bool:
    """Whether this process's metric values live in the shared mmap files.

    False while PROMETHEUS_MULTIPROC_DIR is set means prometheus-client was imported
    before the variable was: this process's numbers would be invisible to scrapes.
    """
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def setup_multiproc_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (or empty it of stale files) and export PROMETHEUS_MULTIPROC_DIR.

    Call once, in the parent, before the processes that record metrics start: in
    `spool api` before exec'ing gunicorn, in `spool worker` before Celery forks. Never
    call it in a child: it deletes the live processes' files. Only *.db files are
    removed, not the directory, which may be a mounted tmpfs.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live gauges (call from gunicorn's `child_exit` hook)."""
    if multiprocess_dir():
        _mp.mark_process_dead(pid)


def add_scrape_collector(collector: LiveCollector) -> None:
    """Expose `collector` on this process's /metrics (the API registers its LiveCollector)."""
    with _extra_lock:
        _extra_collectors.append(collector)


def registry_for_scrape() -> CollectorRegistry:
    """The registry to expose: every process's files in multiprocess mode, else the default."""
    with _extra_lock:
        extras = list(_extra_collectors)
        if multiprocess_dir():
            # A fresh registry per scrape, as prometheus-client asks: the default one
            # holds only this process's values.
            registry = CollectorRegistry(auto_describe=False)
            _mp.MultiProcessCollector(registry)
            for collector in extras:
                registry.register(collector)
            return registry
        for collector in extras:
            if id(collector) not in _registered_in_default:
                REGISTRY.register(collector)
                _registered_in_default.add(id(collector))
        return REGISTRY


def render() -> tuple[bytes, str]:
    """The /metrics body and its content type."""
    sample_gpu_memory()
    return generate_latest(registry_for_scrape()), CONTENT_TYPE


class _ScrapeView:
    """What the worker metrics server exposes: GPU memory sampled, then the scrape registry."""

    def collect(self) -> Iterable[Metric]:
        sample_gpu_memory()
        return registry_for_scrape().collect()

    def restricted_registry(self, names: Iterable[str]) -> Collector:
        sample_gpu_memory()
        return registry_for_scrape().restricted_registry(names)


def start_worker_metrics_server(port: int, addr: str = "0.0.0.0") -> bool:
    """Serve this worker's /metrics on `port` in a daemon thread; port 0 disables it.

    Start it in the parent worker process (one server per container): in multiprocess
    mode it aggregates the pool children's files too. Returns whether it started.
    """
    if port <= 0:
        return False
    start_http_server(port, addr=addr, registry=_ScrapeView())
    return True
