"""The `spool` command against a real database."""

from __future__ import annotations

import subprocess

from tests import support


def run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        support.SPOOL + list(args),
        env=env,
        capture_output=True,
        text=True,
        cwd=support.ROOT,
        timeout=120,
        check=check,
    )


def test_refuses_to_start_on_unmigrated_database(services: support.Services, tmp_path) -> None:
    url = services.create_database()  # empty: no migration applied
    try:
        p = support.Platform(url, services.redis_url, tmp_path)
        out = run(p.env(), "api", check=False)
        assert out.returncode != 0
        assert "spool db upgrade" in out.stderr + out.stdout
        out = run(p.env(), "worker", "--models", "echo", check=False)
        assert out.returncode != 0 and "spool db upgrade" in out.stderr + out.stdout
        assert run(p.env(), "db", "upgrade").returncode == 0
    finally:
        services.drop_database(url)


def test_users_create_prints_key_last_and_revoke(database_url: str, platform) -> None:
    env = platform.env()
    out = run(env, "users", "create", "cli-user")
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("sk_")
    api = support.Api(platform.url, key)
    assert api.get("/v1/jobs").status_code == 200
    assert run(env, "users", "create", "cli-user", check=False).returncode != 0  # exists
    assert "revoked 1 key" in run(env, "users", "revoke", "cli-user").stdout
    assert api.get("/v1/jobs").status_code == 401
    r = api.post("/v1/auth/token", json={"api_key": key})
    assert r.status_code == 401


def test_models_init_random_builds_presets_and_refuses_unknown_names(tmp_path) -> None:
    import os

    env = {**os.environ, "SPOOL_VAR_DIR": str(tmp_path)}
    out = run(env, "models", "init-random", "tiny-llm")
    assert out.stdout.strip() == f"tiny-llm: {tmp_path / 'models' / 'tiny-llm'}"
    assert (tmp_path / "models" / "tiny-llm" / "tokenizer.json").is_file()
    bad = run(env, "models", "init-random", "gpt-5", check=False)
    assert bad.returncode == 2 and "unknown gpt-5" in bad.stderr and "sd15-random" in bad.stderr


def test_models_check_loads_each_model_runs_a_job_and_names_what_failed(tmp_path) -> None:
    import os

    env = {**os.environ, "SPOOL_VAR_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    run(env, "models", "init-tiny")
    registry = tmp_path / "models.yaml"
    registry.write_text(
        "models:\n"
        "  echo: {kind: echo}\n"
        "  tiny-sd: {kind: image.generate, source: '${SPOOL_VAR_DIR}/models/tiny-sd',"
        " limits: {min_width: 32, min_height: 32}}\n"
        "  tiny-llm: {kind: text.generate, source: '${SPOOL_VAR_DIR}/models/tiny-llm'}\n"
        f"  broken: {{kind: text.generate, source: '{tmp_path}/nothing-here'}}\n"
    )
    env["SPOOL_MODELS_FILE"] = str(registry)
    out = run(env, "models", "check", check=False)
    assert out.returncode == 1, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert set(lines) == {"echo", "tiny-sd", "tiny-llm", "broken"}
    assert lines["echo"].endswith("ok")
    sd = lines["tiny-sd"]
    assert "cpu float32" in sd and "1 image of 64x64, 1 step in" in sd and sd.endswith("ok")
    assert " s (again: " in sd  # the same job once warm
    assert "M params" in sd and "1 token in" in lines["tiny-llm"]
    assert (
        f"FAILED to load: model broken failed to load from {tmp_path}/nothing-here"
        in (lines["broken"])
    )
    assert run(env, "models", "check", "tiny-llm").stdout.count("\n") == 1  # only it
    import json

    report = json.loads(run(env, "models", "check", "--json", "echo", "broken", check=False).stdout)
    assert [(r["name"], r["ok"]) for r in report] == [("echo", True), ("broken", False)]
    assert report[0]["job_s"] is not None and "nothing-here" in report[1]["error"]
    assert report[0]["again_s"] is not None and report[1]["again_s"] is None
    bad = run(env, "models", "check", "gpt-5", check=False)
    assert bad.returncode == 2 and "not in the registry: gpt-5" in bad.stderr


def test_a_broken_registry_stops_each_command_at_start_with_its_reason(
    database_url: str, services: support.Services, tmp_path
) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text("models:\n  sd:\n    kind: image.generate\n    vae_tilling: true\n")
    p = support.Platform(database_url, services.redis_url, tmp_path)
    env = p.env(SPOOL_MODELS_FILE=str(registry))
    for args in (["api"], ["worker", "--models", "sd"], ["models", "check"], ["models", "list"]):
        out = run(env, *args, check=False)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "model registry: model 'sd': unknown setting(s) vae_tilling" in out.stderr, args
        assert "Traceback" not in out.stderr, args
