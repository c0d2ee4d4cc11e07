#!/usr/bin/env bash
# Installs the system tools the deploy tests use, from Debian's archive:
#   docker-compose   validates compose.prod.yml offline (`docker-compose config` needs no engine;
#                    PyPI's docker-compose no longer builds, Debian's still works)
#   postgresql-client  pg_dump / pg_restore for docker/backup.sh
#   prometheus       for promtool: checks docker/alerts.yml and parses the dashboard's queries
#                    (only the tool is used; no Prometheus server is started or needed)
# Idempotent: does nothing (and no apt-get update) when all tools are already on PATH.
# Without root (and no passwordless sudo) it prints what is missing and exits 0, so
# `make` keeps going; the tests that need a missing tool skip and say why.
set -euo pipefail

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v pg_dump >/dev/null 2>&1 || missing+=(postgresql-client)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "install-system-deps: not root; install these yourself: ${missing[*]}" >&2
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: no apt-get here; install these yourself: ${missing[*]}" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-system-deps: installed ${missing[*]}"
