#!/usr/bin/env bash
# The GPU run of the inference benchmark (issue 3): random-weight models of real size
# (Stable Diffusion 1.5's shapes at 512x512, 20 steps, float16; a 1.1B-parameter Llama,
# 128 new tokens, bfloat16) through the platform, batched and unbatched, against the
# direct pipeline; images/s and tokens/s. Made for a lent H200 (the device tool: offline,
# CUDA PyTorch and transformers installed, no PostgreSQL or Redis server).
#
# Here, once:   bash scripts/device-wheels.sh          (the other packages, ~40 MB, in .whl/)
# There:        run(command="bash scripts/gpu-bench.sh", carry=[".whl"], timeout_s=600)
# Locally, with a GPU and `make install` done: PY=.venv/bin/python bash scripts/gpu-bench.sh
#
# Prints the summary tables last; writes gpu-bench.json and gpu-bench.log to $OUT (or /tmp).
# Budget on an H200 (measured 2026-12-04): 49 s to build both models; the 1.1B model's
# windows and direct calls took 3 min 10 s; the CUDA tests 25 s, `spool models check` ~30 s.
# A first run with 16 clients on the micro-batching-off runs as well did not finish both
# models in 6.5 min: a window's end waits for every client's job in flight, and with
# batching off those run one at a time (~2 s each); 4 clients keep the worker as busy.
# BUDGET_S (540) caps the whole, SECONDS_PER_MODE shortens the windows, GPU_CHECKS=0 skips
# all but the benchmark, PROFILE=gil|all profiles it (below); arguments go to the
# benchmark (e.g. --only llm).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp}
PY=${PY:-python3}

# The device's Python has torch but not the platform's packages: install the carried ones.
if ! "$PY" -c 'import celery, flask, diffusers' 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# The models (4 GB) go to local disk, not into the copy of the working tree.
export SPOOL_VAR_DIR=${SPOOL_VAR_DIR:-/tmp/spool-var}

# As root, the embedded PostgreSQL (pgserver) runs postgres as a user it makes with useradd.
if [ "$(id -u)" = 0 ] && ! command -v useradd >/dev/null; then
    echo "gpu-bench: running as root without useradd: the embedded PostgreSQL cannot start" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT_DIR/gpu-bench.log"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' \
    2>&1 | tee -a "$OUT_DIR/gpu-bench.log"
# Within the device tool's 600 s per call: each stage gets what is left of BUDGET_S.
BUDGET_S=${BUDGET_S:-540}
left() { echo $((BUDGET_S - SECONDS > 10 ? BUDGET_S - SECONDS : 10)); }
# PROFILE=gil (or all): py-spy samples every process of the run, only the GIL's holder (or
# every thread); `python -m bench.profile_summary gpu-bench-prof.txt.gz` reads it.
profiler=()
if [ -n "${PROFILE:-}" ] && command -v py-spy >/dev/null; then
    profiler=(py-spy record --nonblocking -s -r 100 -f raw -o "$OUT_DIR/gpu-bench-prof.txt")
    [ "$PROFILE" = gil ] && profiler+=(--gil)
    profiler+=(--)
fi
timeout "$((BUDGET_S - ${GPU_CHECKS:-1} * 150))" "${profiler[@]}" "$PY" -m bench.bench_inference_platform --workload real \
    --clients 16 --unbatched-clients 4 --seconds "${SECONDS_PER_MODE:-16}" --repeats 3 \
    --json "$OUT_DIR/gpu-bench.json" "$@" 2>&1 | grep -v '^{"event' | tee -a "$OUT_DIR/gpu-bench.log"
# $OUT takes files of up to 16 MiB: a profile of the whole run is several times that raw.
[ -f "$OUT_DIR/gpu-bench-prof.txt" ] && gzip -f "$OUT_DIR/gpu-bench-prof.txt"
[ "${GPU_CHECKS:-1}" = 1 ] || exit 0  # GPU_CHECKS=0: the benchmark alone
# The backends' CUDA path on the tiny models: half dtypes, seeds, batched against alone.
timeout "$(left)" "$PY" -m pytest -p no:cacheprovider -q -s -m gpu tests/unit/test_cuda_backends.py \
    2>&1 | grep -v '^{"event' | tee -a "$OUT_DIR/gpu-bench.log"
# Each model loaded alone and one small job on it: load time, parameters, peak GPU memory.
SPOOL_MODELS_FILE="$SPOOL_VAR_DIR/bench-real-models.yaml" timeout "$(left)" "$PY" -m spool.cli \
    models check sd15-random llama-1b-random 2>&1 | grep -v '^{"event' | tee -a "$OUT_DIR/gpu-bench.log"
