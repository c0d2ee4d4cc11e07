# syntax=docker/dockerfile:1.7
# The GPU worker image: Celery worker + torch (CUDA) + diffusers/transformers.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t spool-worker .
# Runs on a host with the NVIDIA container toolkit (compose: device reservation
# `driver: nvidia`; Kubernetes: `nvidia.com/gpu` limits).
#
# The repository's constraints.txt pins the CPU torch build for CI machines; here the
# CUDA build comes from PyTorch's index instead (TORCH_INDEX). Its wheels bundle the
# CUDA and cuDNN libraries they need, so CUDA_IMAGE may be the much smaller
# nvidia/cuda:<ver>-base-ubuntu22.04 (~3 GB less) when nothing else needs system CUDA.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG PYTHON_VERSION=3.11
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.5

FROM ${UV_IMAGE} AS uv

# Build on the same Ubuntu release as the runtime image, so compiled extensions match its glibc.
FROM ubuntu:22.04 AS build
ARG PYTHON_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
# Unpinned on purpose (both stages): a rebuild picks up Ubuntu's security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
# Ubuntu 22.04 ships Python 3.10; uv installs a relocatable CPython 3.11 under
# /opt/python, which the runtime stage copies to the same path.
RUN uv python install ${PYTHON_VERSION} \
 && uv venv --python ${PYTHON_VERSION} /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index, in its own layer: it is by far the biggest and
# changes least often.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --index-url ${TORCH_INDEX} "torch==${TORCH_VERSION}"
# Same layout as the API image: code in /app, installed in editable mode, so the
# alembic files sit beside the packages.
WORKDIR /app
COPY pyproject.toml setup.cfg setup.py constraints.txt README.md ./
COPY celery_config.py alembic.ini ./
COPY migrations/ migrations/
COPY spool/ spool/
COPY api/ api/
COPY workers/ workers/
# The torch installed above (2.13.0+cuXXX) satisfies the constraint torch==2.13.0,
# so the gpu extra keeps it instead of fetching the CPU build.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install -c constraints.txt -e ".[gpu]" \
 && python -c "import torch; assert torch.version.cuda, 'CPU torch was installed'"

FROM ${CUDA_IMAGE} AS runtime
ARG SPOOL_UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SPOOL_ENV=production \
    SPOOL_LOG_FORMAT=json \
    SPOOL_VAR_DIR=/models \
    SPOOL_METRICS_PORT=9750 \
    HF_HOME=/models/huggingface \
    PROMETHEUS_MULTIPROC_DIR=/tmp/spool-metrics
# Mount points exist and belong to the service user, so a named volume mounted there
# for the first time starts out writable by it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid ${SPOOL_UID} spool \
 && useradd --system --uid ${SPOOL_UID} --gid spool --create-home --home-dir /home/spool \
        --shell /usr/sbin/nologin spool \
 && install -d -o spool -g spool /models /data/artifacts
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
# Numeric, so that Kubernetes can check runAsNonRoot.
USER ${SPOOL_UID}:${SPOOL_UID}
# Weights (hub cache and `spool models init-tiny` output) live here, so a restarted
# container serves its first job without downloading again.
VOLUME ["/models"]
EXPOSE 9750
# `spool worker-check` asks this container's worker whether it is alive. The long
# start period covers downloading and loading weights before the first check counts.
HEALTHCHECK --interval=30s --timeout=20s --start-period=600s --retries=3 \
    CMD ["spool", "worker-check"]
ENTRYPOINT ["spool"]
CMD ["worker"]
