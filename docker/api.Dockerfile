# syntax=docker/dockerfile:1.7
# The API image: Flask behind gunicorn with gevent workers; no torch, no CUDA.
# Build from the repository root:  docker build -f docker/api.Dockerfile -t spool-api .
# The same image runs one-shot commands: `spool db upgrade`, `spool users create NAME`.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Compilers live only in this stage: a dependency without a wheel builds here and the
# toolchain never ships. Unpinned on purpose: a rebuild picks up Debian's security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The code stays in /app and is installed in editable mode: `spool db upgrade` finds
# alembic.ini and migrations/ beside the packages (spool/db.py looks there), and the
# runtime stage copies /app to the same path so the install still points at it.
WORKDIR /app
COPY pyproject.toml setup.cfg setup.py constraints.txt README.md ./
COPY celery_config.py alembic.ini ./
COPY migrations/ migrations/
COPY spool/ spool/
COPY api/ api/
COPY workers/ workers/
# The pip cache is a build mount, so it speeds up rebuilds without entering a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt -e . \
 && pip check \
 && python -m compileall -q /app

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ARG SPOOL_UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SPOOL_ENV=production \
    SPOOL_LOG_FORMAT=json \
    SPOOL_HOST=0.0.0.0 \
    SPOOL_PORT=8000 \
    SPOOL_VAR_DIR=/var/lib/spool \
    PROMETHEUS_MULTIPROC_DIR=/tmp/spool-metrics
# Mount points exist and belong to the service user, so a named volume mounted there
# for the first time starts out writable by it.
RUN groupadd --system --gid ${SPOOL_UID} spool \
 && useradd --system --uid ${SPOOL_UID} --gid spool --create-home --home-dir /home/spool \
        --shell /usr/sbin/nologin spool \
 && install -d -o spool -g spool /var/lib/spool /data/artifacts
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
# Code is root-owned and read-only for the service user. A numeric user lets Kubernetes
# check runAsNonRoot.
USER ${SPOOL_UID}:${SPOOL_UID}
EXPOSE 8000
# urllib rather than curl: the slim image has no curl, and one fewer package to patch.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SPOOL_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["spool"]
# `spool api` execs gunicorn (api/gunicorn_conf.py: gevent workers), so gunicorn is
# PID 1 and gets SIGTERM directly for a graceful stop.
CMD ["api"]
