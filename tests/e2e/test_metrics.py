"""/metrics of a running API and worker after jobs ran: every metric is there, with values."""

from __future__ import annotations

import json
import re
import subprocess

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import support


def scrape(url: str) -> dict[str, list]:
    text = requests.get(url, timeout=10).text
    fams: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        fams.setdefault(fam.name, []).extend(fam.samples)
    return fams


def value(fams: dict[str, list], name: str, **labels: str) -> float:
    return sum(
        s.value
        for samples in fams.values()
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_api_and_worker_metrics(services: support.Services, tmp_path) -> None:
    p = support.IsolatedPlatform(services, tmp_path)
    try:
        p.start_api(SPOOL_API_WORKERS="2")
        p.start_beat()
        wport = support.free_port()
        p.start_worker(models="echo", queues="spool.cpu", SPOOL_METRICS_PORT=str(wport))
        api = support.Api(p.url, p.user())
        ok = [api.submit({"value": i}) for i in range(6)]
        bad = api.submit({"fail": True})
        queued_cancel = api.submit({"sleep_s": 1}, ttl_s=3600)
        for j in ok + [bad, queued_cancel]:
            api.wait(j["id"])
        api.get("/v1/jobs/job_nope")

        fams = scrape(p.url + "/metrics")
        # Requests are summed over both gunicorn processes (multiprocess mode).
        assert (
            value(
                fams, "spool_http_requests_total", endpoint="/v1/jobs", method="POST", status="202"
            )
            == 8
        )
        assert value(fams, "spool_http_requests_total", status="404") >= 1
        assert value(fams, "spool_http_request_duration_seconds_count") > 0
        assert value(fams, "spool_jobs_submitted_total", kind="echo", model="echo") == 8
        assert value(fams, "spool_jobs_queued", model="echo") == 0
        assert value(fams, "spool_workers_online", model="echo") == 1
        assert "spool_queue_length" in fams and "spool_jobs_running" in fams
        assert "spool_http_requests_in_flight" in fams

        w = scrape(f"http://127.0.0.1:{wport}/metrics")
        assert value(w, "spool_jobs_started_total", model="echo") == 8
        assert value(w, "spool_jobs_finished_total", model="echo", status="succeeded") == 7
        assert value(w, "spool_jobs_finished_total", model="echo", status="failed") == 1
        assert value(w, "spool_job_queue_wait_seconds_count", model="echo") == 8
        assert value(w, "spool_job_run_seconds_count", model="echo") == 8
        assert value(w, "spool_job_run_seconds_sum", model="echo") >= 1.0  # the 1 s sleeper
        assert value(w, "spool_job_attempts_total", model="echo") == 8

        # Structured logs: one JSON line per request (API) and per job transition (worker).
        api_lines = [
            json.loads(line) for line in p.api.log.read_text().splitlines() if line.startswith("{")
        ]
        reqs = [e for e in api_lines if e.get("event") == "request"]
        assert reqs and all(e["request_id"] and e["status"] for e in reqs)
        worker_lines = [
            json.loads(line)
            for line in p.workers[0].log.read_text().splitlines()
            if line.startswith("{")
        ]
        started = {e["job_id"] for e in worker_lines if e.get("event") == "job started"}
        finished = {e["job_id"] for e in worker_lines if e.get("event") == "job finished"}
        assert started == finished == {j["id"] for j in ok + [bad, queued_cancel]}

        # The container liveness probe sees this worker, and fails once it is gone.
        check = subprocess.run(
            support.SPOOL + ["worker-check"],
            env=p.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
        p.workers[0].stop()  # a warm shutdown withdraws its liveness record
        check = subprocess.run(
            support.SPOOL + ["worker-check"],
            env=p.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode != 0
    finally:
        p.close()


def test_request_id_is_echoed(platform: support.Platform, api: support.Api) -> None:
    r = api.get("/v1/jobs", headers={"X-Request-ID": "req-abc-123"})
    assert r.headers["X-Request-ID"] == "req-abc-123"
    generated = api.get("/v1/jobs").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    log = (platform.var_dir / "api.log").read_text()
    assert '"request_id": "req-abc-123"' in log
