"""Client commands of the ``spool`` CLI: submit jobs and batches, follow them, fetch results.

They talk HTTP to a running server, configured by ``SPOOL_URL`` (default
http://127.0.0.1:8000) and ``SPOOL_API_KEY`` (else the key ``spool up`` left in
``./var/dev-api-key``). Data goes to stdout, progress and notes to stderr, and
``--json`` prints machine-readable JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import click

from spool.client import JOB_TERMINAL, JSON, Client, SpoolError, WaitTimeout

DEFAULT_URL = "http://127.0.0.1:8000"

P = ParamSpec("P")
R = TypeVar("R")


def make_client() -> Client:
    """A client configured from the environment (see the module docstring)."""
    url = os.environ.get("SPOOL_URL") or DEFAULT_URL
    key = os.environ.get("SPOOL_API_KEY", "").strip()
    if not key:
        key_file = Path(os.environ.get("SPOOL_VAR_DIR") or "var") / "dev-api-key"
        if key_file.is_file():
            key = key_file.read_text().strip()
    if not key:
        raise click.UsageError(
            "no API key: set SPOOL_API_KEY (or run `spool up` here, which writes var/dev-api-key)"
        )
    return Client(url, key)


def _api_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn API errors into a one-line message and exit status 1 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except SpoolError as exc:
            details = f" {json.dumps(exc.details)}" if exc.details else ""
            raise click.ClickException(f"{exc}{details}") from exc

    return wrapper


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _load_json_arg(value: str, what: str) -> Any:
    """JSON given inline, as @path, or as @- for stdin."""
    try:
        if value == "@-":
            return json.load(sys.stdin)
        if value.startswith("@"):
            return json.loads(Path(value[1:]).read_text())
        return json.loads(value)
    except OSError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from exc
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=what) from exc


def _progress(job: JSON) -> str:
    progress = job.get("progress") or {}
    if progress.get("total"):
        fraction = progress.get("fraction") or progress["current"] / progress["total"]
        return f" {fraction:.0%} ({progress.get('current')}/{progress['total']})"
    return ""


def _describe_outcome(result: JSON, base_url: str) -> None:
    """A person-readable view of a result, job or batch line: output or error."""
    error = result.get("error")
    if error:
        click.echo(f"error: {error.get('code')}: {error.get('message')}")
    output = result.get("output")
    if not isinstance(output, dict):
        if output is not None:
            click.echo(json.dumps(output, ensure_ascii=False))
        return
    if "images" in output:
        for image in output["images"]:
            url = image.get("url", "")
            full = base_url + url if url.startswith("/") else url
            click.echo(
                f"{full}  {image.get('width')}x{image.get('height')} seed={image.get('seed')}"
            )
    elif "text" in output:
        click.echo(output["text"])
    else:
        click.echo(json.dumps(output, indent=2, ensure_ascii=False))


def _finish(result: JSON, client: Client, as_json: bool) -> None:
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result.get('id')} {result.get('status')}", err=True)
        _describe_outcome(result, client.url)
    if result.get("status") != "succeeded":
        sys.exit(1)


# --- jobs ------------------------------------------------------------------------------


@click.command()
@click.argument("kind")
@click.argument("model")
@click.option(
    "--input", "-i", "input_", required=True, metavar="JSON|@FILE",
    help="The job's input: inline JSON, @file.json, or @- for stdin.",
)  # fmt: skip
@click.option("--priority", type=click.Choice(["high", "normal", "low"]))
@click.option("--webhook", metavar="URL", help="POST signed events to this URL.")
@click.option("--metadata", metavar="JSON|@FILE", help="A JSON object kept with the job.")
@click.option("--idempotency-key", help="Resubmitting with the same key returns the same job.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to end; print its result.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_api_errors
def submit(
    kind: str,
    model: str,
    input_: str,
    priority: str | None,
    webhook: str | None,
    metadata: str | None,
    idempotency_key: str | None,
    wait_: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Submit a job; print its id, or with --wait its result.

    Example: spool submit echo echo -i '{"value": 1}' --wait. With --wait the exit
    status is 0 only if the job succeeded.
    """
    job_input = _load_json_arg(input_, "--input")
    if not isinstance(job_input, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--input")
    meta = _load_json_arg(metadata, "--metadata") if metadata else None
    with make_client() as client:
        job = client.submit(
            kind, model, job_input, priority=priority, webhook=webhook, metadata=meta,
            idempotency_key=idempotency_key, wait=min(timeout or 60.0, 60.0) if wait_ else None,
        )  # fmt: skip
        if not wait_:
            if as_json:
                _print_json(job)
            else:
                position = job.get("queue_position")
                where = f" (queue position {position})" if position is not None else ""
                click.echo(f"{job['id']} {job['status']}{where}", err=True)
                click.echo(job["id"])
            return
        if job.get("status") not in JOB_TERMINAL:
            click.echo(f"{job['id']} {job['status']}, waiting…", err=True)
            job = _wait(client, job["id"], timeout)
        _finish(job, client, as_json)


def _wait(client: Client, job_id: str, timeout: float | None) -> JSON:
    try:
        return client.wait(job_id, timeout=timeout)
    except WaitTimeout as exc:
        raise click.ClickException(f"{job_id} still not finished after {timeout} s") from exc


@click.command()
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_api_errors
def status(job_id: str, as_json: bool) -> None:
    """Show a job: status, progress, queue position, output or error."""
    with make_client() as client:
        job = client.get(job_id)
        if as_json:
            _print_json(job)
            return
        click.echo(
            f"{job['id']}  {job.get('kind')}/{job.get('model')}  {job['status']}{_progress(job)}"
        )
        if job.get("queue_position") is not None:
            click.echo(f"queue position: {job['queue_position']}")
        if job.get("batch_id"):
            click.echo(f"batch: {job['batch_id']}")
        _describe_outcome(job, client.url)


@click.command()
@click.argument("job_id", metavar="ID")
@click.option("--timeout", type=float, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_api_errors
def wait(job_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to end and print its result; exit status 0 only if it succeeded."""
    with make_client() as client:
        _finish(_wait(client, job_id, timeout), client, as_json)


@click.command()
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_api_errors
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job (a running job stops at its next step or token)."""
    with make_client() as client:
        job = client.cancel(job_id)
    if as_json:
        _print_json(job)
    else:
        click.echo(f"{job['id']} {job['status']}")


@click.command()
@click.argument("job_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per event.")
@_api_errors
def events(job_id: str, as_json: bool) -> None:
    """Follow a job's live events until it ends; text tokens are printed as they come."""
    with make_client() as client:
        in_text = False
        for event in client.events(job_id):
            try:
                data: Any = event.json()
            except ValueError:
                data = event.data
            if as_json:
                line = {"id": event.id, "event": event.event, "data": data}
                click.echo(json.dumps(line, ensure_ascii=False))
                continue
            if event.event == "token" and isinstance(data, dict) and "text" in data:
                click.echo(data["text"], nl=False)
                in_text = True
                continue
            if in_text:
                click.echo()
                in_text = False
            click.echo(f"{event.event}: {_event_summary(data)}")


def _event_summary(data: Any) -> str:
    """One short line for a person: the status (and error) or the progress, else the JSON."""
    if isinstance(data, dict) and "status" in data:
        error = data.get("error")
        why = f" ({error.get('code')}: {error.get('message')})" if isinstance(error, dict) else ""
        return f"{data['status']}{_progress(data)}{why}"
    if isinstance(data, dict) and data.get("total"):
        return _progress({"progress": data}).strip()
    return data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)


# --- batches --------------------------------------------------------------------------------


@click.group()
def batch() -> None:
    """Batches: many jobs from one NDJSON file (one POST /v1/jobs body per line)."""


def _scan_jobs_file(path: Path) -> tuple[str, int, bool]:
    """SHA-256 of the file, its number of jobs, and whether it has blank lines.

    Every line is parsed so that a typo is reported with its line number before
    anything is sent.
    """
    digest = hashlib.sha256()
    count, blank = 0, False
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            digest.update(line)
            if not line.strip():
                blank = True
                continue
            try:
                job = json.loads(line)
            except ValueError as exc:
                raise click.ClickException(f"{path}:{number}: not valid JSON: {exc}") from exc
            if not isinstance(job, dict):
                raise click.ClickException(f"{path}:{number}: each line must be a JSON object")
            count += 1
    return digest.hexdigest(), count, blank


def _iter_jobs(path: Path) -> Iterator[JSON]:
    with path.open("rb") as file:
        for line in file:
            if line.strip():
                yield json.loads(line)


def _done(batch_obj: JSON) -> int:
    counts = batch_obj.get("counts") or {}
    return sum(int(counts.get(k) or 0) for k in ("succeeded", "failed", "canceled", "expired"))


def _wait_batch_with_bar(client: Client, batch_obj: JSON, interval: float) -> JSON:
    from tqdm import tqdm

    total = int((batch_obj.get("counts") or {}).get("total") or 0)
    with tqdm(total=total, unit="job", desc=batch_obj["id"], file=sys.stderr) as bar:

        def update(current: JSON) -> None:
            bar.update(_done(current) - bar.n)
            counts = current.get("counts") or {}
            bar.set_postfix(failed=counts.get("failed", 0), refresh=False)

        return client.wait_batch(batch_obj["id"], interval=interval, on_update=update)


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--webhook", metavar="URL", help="POST a signed batch.completed event here.")
@click.option(
    "--idempotency-key",
    help="Default: derived from the file's SHA-256, so re-running after an interruption "
    "returns the batch already created instead of a duplicate.",
)
@click.option("--wait", "wait_", is_flag=True, help="Show progress until the batch completes.")
@click.option(
    "--poll-interval", type=click.FloatRange(min=0.01), default=2.0, show_default=True,
    help="With --wait: seconds between looks at the batch.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the batch as JSON.")
@_api_errors
def batch_submit(
    file: Path,
    webhook: str | None,
    idempotency_key: str | None,
    wait_: bool,
    poll_interval: float,
    as_json: bool,
) -> None:
    """Submit FILE.jsonl as one batch; lines may carry a `custom_id`."""
    sha256, count, blank = _scan_jobs_file(file)
    if count == 0:
        raise click.ClickException(f"{file}: no jobs")
    with make_client() as client:
        if webhook is None and not blank:
            # Streamed from disk as it is: the bytes hashed are the bytes sent.
            key = idempotency_key or f"batch-sha256-{sha256}"
            created = client.submit_batch_file(file, idempotency_key=key)
        else:
            extra = hashlib.sha256(f"{sha256}\n{webhook or ''}".encode()).hexdigest()
            key = idempotency_key or f"batch-sha256-{extra}"
            created = client.submit_batch(_iter_jobs(file), webhook=webhook, idempotency_key=key)
        click.echo(f"{created['id']}: {count} jobs, {created['status']}", err=True)
        final = _wait_batch_with_bar(client, created, poll_interval) if wait_ else created
    if as_json:
        _print_json(final)
    else:
        if wait_:
            click.echo(_counts_line(final), err=True)
        click.echo(final["id"])


def _counts_line(batch_obj: JSON) -> str:
    counts = batch_obj.get("counts") or {}
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    return f"{batch_obj['id']} {batch_obj.get('status')}: {shown}"


def _show_batch(batch_obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(batch_obj)
    else:
        click.echo(_counts_line(batch_obj))


@batch.command("status")
@click.argument("batch_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_api_errors
def batch_status(batch_id: str, as_json: bool) -> None:
    """Show a batch's status and live counts."""
    with make_client() as client:
        _show_batch(client.batch(batch_id), as_json)


@batch.command("cancel")
@click.argument("batch_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_api_errors
def batch_cancel(batch_id: str, as_json: bool) -> None:
    """Cancel every job of the batch that has not finished."""
    with make_client() as client:
        _show_batch(client.cancel_batch(batch_id), as_json)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _file_name(row: JSON, index: int, url: str) -> str:
    stem = _UNSAFE.sub("_", str(row.get("custom_id") or row.get("job_id") or "job")).strip("._")
    suffix = PurePosixPath(urlsplit(url).path).suffix or ".png"
    return f"{stem or 'job'}-{index}{suffix}"


@batch.command("results")
@click.argument("batch_id", metavar="ID")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
    help="Write the NDJSON lines here instead of stdout.",
)  # fmt: skip
@click.option(
    "--download", "download_dir", type=click.Path(file_okay=False, path_type=Path),
    help="Save every image of the outputs into this directory.",
)  # fmt: skip
@_api_errors
def batch_results(batch_id: str, output: Path | None, download_dir: Path | None) -> None:
    """Stream the results, one JSON line per job: custom_id, job_id, status, output, error."""
    if download_dir is not None:
        download_dir.mkdir(parents=True, exist_ok=True)
    rows = files = 0
    with make_client() as client:
        sink = output.open("w", encoding="utf-8") if output else None
        try:
            for row in client.batch_results(batch_id):
                line = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
                if sink is not None:
                    sink.write(line + "\n")
                else:
                    click.echo(line)
                rows += 1
                images = (row.get("output") or {}).get("images") or []
                if download_dir is not None:
                    for index, image in enumerate(images):
                        client.download(
                            image["url"], download_dir / _file_name(row, index, image["url"])
                        )
                        files += 1
        finally:
            if sink is not None:
                sink.close()
    if output is not None:
        click.echo(f"{rows} results written to {output}", err=True)
    if download_dir is not None:
        click.echo(f"{files} files saved in {download_dir}", err=True)


def register(cli: click.Group) -> None:
    """Add the client commands (and the ``batch`` group) to the main ``spool`` group."""
    for command in (submit, status, wait, cancel, events, batch):
        cli.add_command(command)
