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
