"""The client commands of the `spool` CLI, run against the fake API server."""

from __future__ import annotations

import hashlib
import json
import runpy
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from spool import cli_client
from tests.integration.fakespool import API_KEY, FakeSpool, running


@click.group()
def spool() -> None:
    """Stands in for the lead's main group."""


cli_client.register(spool)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeSpool]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPOOL_VAR_DIR", raising=False)
    with running() as fake:
        monkeypatch.setenv("SPOOL_URL", fake.url)
        monkeypatch.setenv("SPOOL_API_KEY", API_KEY)
        yield fake


def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(spool, list(args), input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_register_adds_the_commands() -> None:
    assert {"submit", "status", "wait", "cancel", "events", "batch"} <= set(spool.commands)
    batch = spool.commands["batch"]
    assert isinstance(batch, click.Group)
    assert {"submit", "status", "results", "cancel"} <= set(batch.commands)


def test_submit_wait_json(server: FakeSpool) -> None:
    code, out, _ = run("submit", "echo", "echo", "-i", '{"value": 5}', "--wait", "--json")
    assert code == 0
    assert json.loads(out) == {"id": "job_1", "status": "succeeded", "output": {"value": 5}}
    assert server.seen_at("POST", "/v1/jobs")[0].headers["Prefer"] == "wait=60"


def test_submit_prints_the_id_and_reads_input_files(server: FakeSpool, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"value": [1, 2]}')
    code, out, err = run("submit", "echo", "echo", "--input", "@in.json", "--priority", "low")
    assert code == 0 and out.strip() == "job_1" and "queued" in err
    sent = json.loads(server.seen_at("POST", "/v1/jobs")[0].body)
    assert sent["input"] == {"value": [1, 2]} and sent["priority"] == "low"
    code, out, _ = run("submit", "echo", "echo", "-i", "@-", input='{"value": 3}')
    assert code == 0 and out.strip() == "job_2"


def test_submit_rejects_bad_json(server: FakeSpool) -> None:
    code, _, err = run("submit", "echo", "echo", "-i", "{nope")
    assert code == 2 and "not valid JSON" in err
    assert server.seen_at("POST", "/v1/jobs") == []


def test_status_wait_cancel(server: FakeSpool) -> None:
    server.new_job({"kind": "echo", "model": "echo", "input": {}}, finish_in=None)
    code, out, _ = run("status", "job_1")
    assert code == 0 and "job_1" in out and "queued" in out
    code, out, _ = run("status", "job_1", "--json")
    assert json.loads(out)["id"] == "job_1"
    code, out, _ = run("cancel", "job_1")
    assert code == 0 and out.strip() == "job_1 canceled"
    code, _, err = run("wait", "job_1")
    assert code == 1 and "canceled" in err  # scripts can tell a failed job by the exit status


def test_api_errors_are_one_line_messages(server: FakeSpool) -> None:
    code, _, err = run("status", "job_missing")
    assert code == 1
    assert "404 not_found: no job job_missing" in err
    assert "Traceback" not in err


def test_events(server: FakeSpool) -> None:
    server.new_job({"kind": "echo", "model": "echo", "input": {}})
    code, out, _ = run("events", "job_1")
    assert code == 0
    assert out.splitlines() == [
        "status: running",
        "progress: 50% (1/2)",
        "progress: 100% (2/2)",
        "done: succeeded",
    ]
    server.event_connections = 0  # the fake drops the first connection of each run
    code, out, _ = run("events", "job_1", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["1", "2", "3", "4"]


def test_dev_api_key_file_is_the_fallback(
    server: FakeSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPOOL_API_KEY")
    code, _, err = run("status", "job_1")
    assert code == 2 and "SPOOL_API_KEY" in err
    Path("var").mkdir()
    Path("var/dev-api-key").write_text(API_KEY + "\n")
    server.new_job({"kind": "echo", "model": "echo", "input": {}})
    code, _, _ = run("status", "job_1")
    assert code == 0


JOBS = "".join(
    json.dumps({"custom_id": f"c{i}", "kind": "echo", "model": "echo", "input": {"value": i}})
    + "\n"
    for i in range(4)
)


def test_batch_submit_is_idempotent_per_file(server: FakeSpool, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(JOBS)
    code, first, _ = run("batch", "submit", str(path))
    assert code == 0
    code, second, _ = run("batch", "submit", str(path))
    assert first == second  # an interrupted run repeated creates nothing new
    posts = server.seen_at("POST", "/v1/batches")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert {p.headers["Idempotency-Key"] for p in posts} == {f"batch-sha256-{digest}"}
    assert posts[0].headers["Content-Type"] == "application/x-ndjson"
    assert posts[0].body == path.read_bytes()


def test_batch_submit_wait_shows_progress_and_prints_json(
    server: FakeSpool, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(JOBS.replace("\n", "\n\n", 1))  # a blank line: sent re-encoded
    server_polls = server.batch_polls
    code, out, _ = run("batch", "submit", str(path), "--wait", "--poll-interval", "0.05", "--json")
    assert code == 0
    final = json.loads(out)
    assert final["status"] == "completed" and final["counts"]["failed"] == 1
    assert sum(server_polls.values()) == 4
    body = server.seen_at("POST", "/v1/batches")[0].body
    assert [json.loads(line)["custom_id"] for line in body.splitlines()] == ["c0", "c1", "c2", "c3"]


def test_batch_submit_reports_the_bad_line(server: FakeSpool, tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(JOBS + "{oops\n")
    code, _, err = run("batch", "submit", str(path))
    assert code == 1 and "jobs.jsonl:5: not valid JSON" in err
    assert server.seen_at("POST", "/v1/batches") == []


def test_batch_status_results_and_downloads(server: FakeSpool, tmp_path: Path) -> None:
    server.batch_polls["bat_1"] = 0
    code, out, _ = run("batch", "status", "bat_1")
    assert code == 0 and out.startswith("bat_1 running")

    code, out, _ = run("batch", "results", "bat_1")
    assert [json.loads(line)["custom_id"] for line in out.splitlines()] == [
        "c0",
        "c1",
        "c2",
        "bad/../id",
    ]

    code, out, err = run("batch", "results", "bat_1", "-o", "out.jsonl", "--download", "images")
    assert code == 0 and out == ""
    assert len(Path("out.jsonl").read_text().splitlines()) == 4
    saved = sorted(p.name for p in Path("images").iterdir())
    assert saved == [f"c{i}-{n}.png" for i in range(3) for n in range(2)]
    assert Path("images/c1-0.png").read_bytes() == b"\x89PNG fake /v1/files/job_1/0.png"
    assert "6 files saved" in err


def test_example_batch_script(
    server: FakeSpool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("prompts.txt").write_text("a red fox\n\na blue whale\n")
    script = Path(__file__).parents[2] / "examples" / "batch_submit.py"
    argv = [
        str(script),
        "prompts.txt",
        "--out",
        "res.jsonl",
        "--images",
        "imgs",
        "--poll-interval",
        "0.01",
    ]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    assert info.value.code == 2  # the fake batch ends with one failed job
    jobs = [json.loads(line) for line in server.seen_at("POST", "/v1/batches")[0].body.splitlines()]
    assert [(j["custom_id"], j["input"]["prompt"]) for j in jobs] == [
        ("line-1", "a red fox"),
        ("line-3", "a blue whale"),
    ]
    assert len(Path("res.jsonl").read_text().splitlines()) == 4
    assert len(list(Path("imgs").iterdir())) == 6
