"""`spool up` as a newcomer runs it: the embedded default, and with external URLs."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import requests

from tests import support

pytestmark = pytest.mark.slow


def start_up(env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(
        support.SPOOL + ["up", "--no-tiny"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=support.ROOT,
        start_new_session=True,
    )


def wait_ready(url: str, proc: subprocess.Popen, log_path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert proc.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.3)
    raise AssertionError("spool up not ready:\n" + log_path.read_text()[-3000:])


def stop_cleanly(proc: subprocess.Popen) -> None:
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3  # api, worker, beat (+ gunicorn workers)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"children left running: {alive}"


def echo_round_trip(url: str, key: str) -> None:
    api = support.Api(url, key)
    job = api.submit({"value": "up"})
    assert api.wait(job["id"], timeout=60)["output"] == {"value": "up"}


def test_up_with_external_services(platform: support.Platform, tmp_path) -> None:
    p = support.Platform(platform.database_url, platform.redis_url, tmp_path)
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = start_up(p.env(), log)
        try:
            wait_ready(p.url, proc, log_path)
            key = (tmp_path / "dev-api-key").read_text().strip()
            assert key in log_path.read_text()  # printed for the newcomer
            echo_round_trip(p.url, key)
            assert not (tmp_path / "pgdata").exists()  # no embedded server started
        finally:
            if proc.poll() is None:
                stop_cleanly(proc)


def test_up_embedded_default(tmp_path) -> None:
    var = support.ROOT / "var" / f"test-up-{os.getpid()}"
    port = support.free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SPOOL_") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(support.FAST_ENV, SPOOL_VAR_DIR=str(var), SPOOL_PORT=str(port))
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = start_up(env, log)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, log_path, timeout=180)
            key = (var / "dev-api-key").read_text().strip()
            echo_round_trip(f"http://127.0.0.1:{port}", key)
            assert (var / "pgdata").exists() and (var / "redis").exists()
        finally:
            if proc.poll() is None:
                stop_cleanly(proc)
    # The embedded servers stopped with it.
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if str(var) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, leftovers
    import shutil

    shutil.rmtree(var, ignore_errors=True)
