"""compose.prod.yml: valid for docker-compose, and shaped the way operations need it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT

COMPOSE_FILE = ROOT / "compose.prod.yml"
ENV_EXAMPLE = ROOT / ".env.prod.example"
GPU_WORKERS = ("worker-image", "worker-llm")
SPOOL_SERVICES = ("migrate", "api", *GPU_WORKERS, "worker-cpu", "beat")
# Every variable the application reads in production must reach its processes.
APP_VARIABLES = {
    "DATABASE_URL", "REDIS_URL", "SPOOL_ENV", "SPOOL_SECRET_KEY", "SPOOL_API_WORKERS",
    "SPOOL_WORKER_CONCURRENCY", "SPOOL_MODELS_FILE", "SPOOL_ARTIFACTS_URL", "SPOOL_LOG_FORMAT",
    "PROMETHEUS_MULTIPROC_DIR",
}  # fmt: skip


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The file as written (anchors and merge keys resolved, variables not interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, Any]:
    return raw["services"]


def _compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (scripts/install-system-deps.sh installs it)")
    return binary


def _env_file_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    # compose.prod.yml reads its env file from SPOOL_ENV_FILE (default .env.prod, which
    # holds real secrets and is not in the repository).
    env["SPOOL_ENV_FILE"] = ENV_EXAMPLE.name
    return env


def test_docker_compose_config_accepts_the_file() -> None:
    proc = subprocess.run(
        [_compose(), "-f", str(COMPOSE_FILE), "config"],
        cwd=ROOT,
        env=_env_file_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    api_env = resolved["services"]["api"]["environment"]
    assert set(api_env) >= APP_VARIABLES, APP_VARIABLES - set(api_env)
    assert api_env["SPOOL_ENV"] == "production"
    assert api_env["SPOOL_LOG_FORMAT"] == "json"
    for name in (*GPU_WORKERS, "worker-cpu"):
        assert resolved["services"][name]["environment"]["SPOOL_METRICS_PORT"] == "9750"


def test_every_service_restarts_and_has_limits(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        if name in ("migrate", "backup"):
            continue
        assert svc.get("restart") == "unless-stopped", name
        assert svc["deploy"]["resources"]["limits"]["memory"], name


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name in ("nginx", "api", *GPU_WORKERS, "worker-cpu", "postgres", "redis"):
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), name
    for name in (*GPU_WORKERS, "worker-cpu"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "spool", "worker-check"]


def test_migrate_runs_before_everything_that_uses_the_database(services: dict[str, Any]) -> None:
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", *GPU_WORKERS, "worker-cpu", "beat"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }, name


def test_commands(services: dict[str, Any]) -> None:
    assert services["api"]["command"] == ["api"]
    assert services["worker-image"]["command"] == ["worker", "--models", "tiny-sd"]
    assert services["worker-llm"]["command"] == ["worker", "--models", "tiny-llm"]
    assert services["worker-cpu"]["command"] == [
        "worker", "--models", "echo", "--queues", "spool.cpu"
    ]  # fmt: skip
    assert services["beat"]["command"] == ["beat"]


def test_exactly_one_beat_and_several_api_replicas(services: dict[str, Any]) -> None:
    assert services["beat"]["deploy"]["replicas"] == 1
    assert "replicas" in services["api"]["deploy"]


def test_gpu_workers_reserve_nvidia_devices(services: dict[str, Any]) -> None:
    for name in GPU_WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert devices[0]["capabilities"] == ["gpu"]
        assert "models:/models" in services[name]["volumes"]
    assert "reservations" not in services["worker-cpu"]["deploy"]["resources"]


def test_redis_never_evicts_and_persists(services: dict[str, Any]) -> None:
    command = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in command
    assert "--appendonly yes" in command
    assert "redisdata:/data" in services["redis"]["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_monitoring_is_provisioned(services: dict[str, Any]) -> None:
    prom = " ".join(services["prometheus"]["volumes"])
    assert "docker/prometheus.yml" in prom and "docker/alerts.yml" in prom
    graf = " ".join(services["grafana"]["volumes"])
    assert "docker/grafana/provisioning" in graf and "docker/grafana/dashboard.json" in graf
    for mounted in re.findall(r"\./(docker/[^:]+):", prom + " " + graf):
        assert (ROOT / mounted).exists(), mounted


def test_only_nginx_is_published_on_all_interfaces(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for port in svc.get("ports", []):
            if name != "nginx":
                assert str(port).startswith("127.0.0.1:"), (name, port)


SECRET_KEY = re.compile(r"SECRET|PASSWORD|TOKEN|^DATABASE_URL$|^REDIS_URL$")


def test_no_secret_literal_in_the_compose_file(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        environment = svc.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: use a mapping for environment"
        leaked = [key for key in environment if SECRET_KEY.search(key)]
        assert not leaked, f"{name} sets {leaked} in compose.prod.yml; put it in the env file"
    for name in (*SPOOL_SERVICES, "postgres", "redis", "grafana"):
        assert services[name]["env_file"] == "${SPOOL_ENV_FILE:-.env.prod}", name


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_env_example_names_every_secret_without_a_value() -> None:
    example = _env_example()
    for key in ("SPOOL_SECRET_KEY", "DATABASE_URL", "REDIS_URL", "POSTGRES_PASSWORD",
                "REDIS_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD"):  # fmt: skip
        assert key in example, key
    for key, value in example.items():
        if "PASSWORD" in key or "SECRET" in key:
            assert value == "", f"{key} has a value in the example file"


def test_env_files_stay_out_of_docker_build_contexts(root: Path) -> None:
    dockerignore = (root / ".dockerignore").read_text().splitlines()
    assert ".env.*" in dockerignore and ".env" in dockerignore
