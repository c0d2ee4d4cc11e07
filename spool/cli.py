"""The `spool` command: run the platform (up, api, worker, beat), migrate, manage users."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from spool import settings


@click.group()
def cli() -> None:
    """Spool: a queue-driven platform for GPU inference jobs."""


# --- database and users ----------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema (Alembic)."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the code's head revision."""
    from spool import db as dbm

    dbm.upgrade()
    click.echo(f"database at {dbm.head_revision()}")


@cli.group()
def users() -> None:
    """Users and API keys."""


@users.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="may see every user's jobs")
def users_create(name: str, admin: bool) -> None:
    """Create a user; prints the new API key (shown once) as the last line."""
    from spool import db as dbm
    from spool import users as um

    try:
        with dbm.transaction() as s:
            user, key = um.create_user(s, name, admin)
    except um.UserExists as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created user {name} ({user.id}){' with admin rights' if admin else ''}")
    click.echo(key)


@users.command("revoke")
@click.argument("name")
def users_revoke(name: str) -> None:
    """Revoke every API key of a user (their tokens stop working at once)."""
    from spool import db as dbm
    from spool import users as um

    try:
        with dbm.transaction() as s:
            n = um.revoke(s, name)
    except um.UserNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"revoked {n} key(s) of {name}")


@users.command("delete")
@click.argument("name")
def users_delete(name: str) -> None:
    """Delete a user (their tokens stop working; their jobs stay for the record)."""
    from spool import db as dbm
    from spool import users as um

    try:
        with dbm.transaction() as s:
            um.delete(s, name)
    except um.UserNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"deleted {name}")


@users.command("key")
@click.argument("name")
def users_key(name: str) -> None:
    """Issue an additional API key for a user (printed once, last line)."""
    from sqlalchemy import select

    from spool import db as dbm
    from spool import users as um
    from spool.models import User

    with dbm.transaction() as s:
        user = s.scalar(select(User).where(User.name == name, User.deleted_at.is_(None)))
        if user is None:
            raise click.ClickException(f"no user {name!r}")
        key = um.add_key(s, user)
    click.echo(key)


def _check_registry() -> None:
    """Read the model registry now: a broken one stops a command at start, with its
    reason, not its first request or job."""
    from spool import registry

    try:
        registry.models()
    except registry.RegistryError as exc:
        raise click.ClickException(f"model registry: {exc}") from exc


# --- models ------------------------------------------------------------------------------


@cli.group()
def models() -> None:
    """The model registry and the tiny test models."""


@models.command("init-tiny")
@click.option("--force", is_flag=True, help="rebuild even if present")
def models_init_tiny(force: bool) -> None:
    """Build tiny random-weight models (real diffusers/transformers classes) under var/models."""
    from spool.tiny_models import init_tiny

    for name, path in init_tiny(settings.get().var_dir, force=force).items():
        click.echo(f"{name}: {path}")


@models.command("init-random")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="rebuild even if present")
def models_init_random(names: tuple[str, ...], force: bool) -> None:
    """Build random-weight models of real size under var/models, to measure a GPU host
    without downloading weights: sd15-random (Stable Diffusion 1.5's shapes),
    llama-1b-random (a 1.1B-parameter Llama); tiny-sd and tiny-llm too. Add a registry
    entry whose `source` is the printed folder to serve one."""
    from spool import tiny_models

    unknown = sorted(set(names) - set(tiny_models.PRESETS))
    if unknown:
        known = ", ".join(tiny_models.PRESETS)
        raise click.BadParameter(
            f"unknown {', '.join(unknown)} (known: {known})", param_hint="NAMES"
        )
    for name, path in tiny_models.init_models(settings.get().var_dir, list(names), force).items():
        click.echo(f"{name}: {path}")


@models.command("check")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="one JSON list on stdout (for scripts)")
def models_check(names: tuple[str, ...], as_json: bool) -> None:
    """Load each model (default: every one in the registry) the way a worker does and run
    one small job on it: device, dtype, size, load and job time, peak GPU memory. Exits 1
    if one fails. The GPUs in use are this process's (CUDA_VISIBLE_DEVICES)."""
    from spool import registry
    from spool.logs import configure

    configure("worker")
    _check_registry()
    unknown = [n for n in names if registry.get(n) is None]
    if unknown:
        known = ", ".join(registry.models())
        raise click.BadParameter(
            f"not in the registry: {', '.join(unknown)} (it has {known})", param_hint="NAMES"
        )
    from workers.check import check, describe

    results = []
    for name in names or tuple(registry.models()):
        spec = registry.get(name)
        assert spec is not None
        results.append(result := check(spec))
        if not as_json:
            click.echo(describe(result))
    if as_json:
        import dataclasses
        import json

        click.echo(json.dumps([{**dataclasses.asdict(r), "ok": r.ok} for r in results], indent=2))
    if not all(r.ok for r in results):
        raise SystemExit(1)


@models.command("list")
def models_list() -> None:
    """Print the registry."""
    from spool import registry

    _check_registry()
    for spec in registry.models().values():
        click.echo(f"{spec.name:<16} {spec.kind:<16} {spec.queue:<28} {spec.source}")


# --- processes ---------------------------------------------------------------------------


@cli.command()
@click.option("--port", type=int, default=None, help="default SPOOL_PORT or 8000")
@click.option("--host", default=None, help="default SPOOL_HOST or 127.0.0.1")
@click.option("--workers", "n_workers", type=int, default=None, help="gunicorn processes")
def api(port: int | None, host: str | None, n_workers: int | None) -> None:
    """Serve the HTTP API with gunicorn (gevent workers)."""
    _check_registry()
    s = settings.get()
    from spool import db as dbm

    dbm.require_head()
    from spool import metrics

    # gunicorn runs several processes: /metrics must sum them (prometheus multiprocess mode).
    metrics.setup_multiproc_dir(
        os.environ.get(metrics.MULTIPROC_ENV) or s.var_dir / "prometheus" / f"api-{port or s.port}"
    )
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        str(Path(__file__).parent.parent / "api" / "gunicorn_conf.py"),
        "--bind",
        f"{host or s.host}:{port or s.port}",
        "--workers",
        str(n_workers or s.api_workers),
        "api.wsgi:app",
    ]
    os.execv(sys.executable, args)


# Slots of a worker serving no model (see `worker`).
HOUSEKEEPING_CONCURRENCY = 32


# Threads of a worker process besides its job slots that use the database (heartbeat,
# event courier, liveness, model warm-up).
WORKER_SIDE_THREADS = 4


def _pools_for(slots: int) -> None:
    """Pools that hold a connection for every thread at once (a batch's jobs finish
    together): smaller ones would open and close connections under load, or make a
    finishing job wait for one."""
    want = slots + WORKER_SIDE_THREADS
    if settings.get().db_pool_size < want:
        os.environ["SPOOL_DB_POOL_SIZE"] = str(want)
        settings.get.cache_clear()


@cli.command()
@click.option(
    "--models",
    "model_names",
    default=None,
    help="comma-separated models to serve (default: every model in the registry)",
)
@click.option(
    "--queues",
    default=None,
    help="extra queues, e.g. spool.cpu (webhooks, sweeper). Alone, without "
    "--models: a housekeeping worker serving no model",
)
@click.option("--concurrency", type=int, default=None, help="jobs in flight per process")
@click.option(
    "--pool",
    default="threads",
    type=click.Choice(["threads", "prefork", "solo"]),
    help="threads: one process per GPU keeps one warm copy of each model",
)
@click.option(
    "--gpus",
    "gpu_spec",
    default=None,
    help="auto (default, SPOOL_GPUS): a worker process per GPU this host shows; "
    "none: one process; or GPU indices / UUIDs, e.g. 0,1",
)
def worker(
    model_names: str | None,
    queues: str | None,
    concurrency: int | None,
    pool: str,
    gpu_spec: str | None,
) -> None:
    """Run a Celery worker for some models' queues (a process per GPU)."""
    from spool import gpus, registry
    from spool.logs import configure

    configure("worker")
    _check_registry()
    if model_names is None and queues:
        names: list[str] = []  # a housekeeping worker: only the queues asked for
    else:
        names = [m for m in (model_names or "").split(",") if m] or list(registry.models())
    unknown = [m for m in names if registry.get(m) is None]
    if unknown:
        raise click.ClickException(f"unknown model(s): {', '.join(unknown)}")
    extra = queues.split(",") if queues else ([] if model_names else ["spool.cpu"])
    try:
        per_gpu = gpus.resolve(gpu_spec if gpu_spec is not None else settings.get().gpus)
    except gpus.GpuSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from exc
    if names and len(per_gpu) > 1:
        from spool import db as dbm

        dbm.require_head()  # here, not in each child started again and again
        passed = [
            *(["--models", model_names] if model_names is not None else []),
            *(["--queues", queues] if queues is not None else []),
            *(["--concurrency", str(concurrency)] if concurrency else []),
            "--pool",
            pool,
        ]
        cfg = settings.get()
        sys.exit(gpus.supervise(passed, per_gpu, cfg.var_dir, cfg.metrics_port))
    os.environ["SPOOL_WORKER_MODELS"] = ",".join(names)
    qs = [registry.queue_name(m) for m in names] + [q for q in extra if q]
    # Jobs of a micro-batch each hold a slot while they wait: auto-size for the largest batch.
    # A housekeeping worker (no models) mostly waits on webhook receivers, some of which
    # hang until the timeout: many slots, so that they cannot hold up the others.
    largest = max((spec.max_batch_size for n in names if (spec := registry.get(n))), default=1)
    auto = max(4, 2 * largest) if names else HOUSEKEEPING_CONCURRENCY
    conc = concurrency or settings.get().worker_concurrency or auto
    if names:  # a housekeeping worker's slots wait on webhook receivers, not the database
        _pools_for(conc)  # before the first engine is made
    from spool import db as dbm

    dbm.require_head()
    from workers.app import app

    app.worker_main(
        [
            "worker",
            "-Q",
            ",".join(qs),
            "-c",
            str(conc),
            "-P",
            pool,
            "-n",
            f"spool-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            "-l",
            settings.get().log_level,
        ]
    )


@cli.command()
def beat() -> None:
    """Run Celery beat (exactly one per deployment): schedules the sweeper."""
    from spool.logs import configure

    configure("beat")
    from workers.app import app

    var = settings.get().var_dir
    var.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "-s", str(var / "celerybeat-schedule"), "-l", settings.get().log_level])


@cli.command("worker-check")
def worker_check() -> None:
    """Liveness probe for a worker container: exit 0 if a worker on this host beat recently."""
    import socket

    from spool import redisconn

    pattern = f"spool:worker-alive:{socket.gethostname()}:*"
    found = next(iter(redisconn.client().scan_iter(match=pattern, count=1000)), None)
    if found is None:
        raise click.ClickException("no live worker on this host")
    click.echo(f"alive: {found.split(':', 2)[2]}")


@cli.command()
@click.option("--port", type=int, default=None, help="API port (default SPOOL_PORT or 8000)")
@click.option("--no-tiny", is_flag=True, help="do not build the tiny models")
def up(port: int | None, no_tiny: bool) -> None:
    """Start the whole platform: API, worker, beat (and embedded PostgreSQL/Redis if no URLs)."""
    from spool import stack

    _check_registry()
    stack.run_up(port=port, build_tiny=not no_tiny)


def _register_client_commands() -> None:
    try:
        from spool import cli_client
    except ImportError:
        return
    cli_client.register(cli)


_register_client_commands()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
