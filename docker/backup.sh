#!/bin/sh
# Spool PostgreSQL backup and restore. PostgreSQL is the source of truth (jobs, batches,
# users, deliveries); Redis holds nothing that the sweeper cannot rebuild, so this is
# the whole backup. POSIX sh: it also runs inside the postgres:16-alpine image.
#
# Usage (DATABASE_URL as the app uses it; a "+driver" suffix such as
# postgresql+psycopg2:// is accepted):
#   DATABASE_URL=postgresql://user:pass@host:5432/spool docker/backup.sh backup [FILE]
#   DATABASE_URL=postgresql://user:pass@host:5432/spool docker/backup.sh restore FILE
#   docker/backup.sh check FILE            # readable archive? lists its contents
#
#   FILE defaults to $BACKUP_DIR/spool-<UTC time>.dump (BACKUP_DIR defaults to ".").
#   BACKUP_KEEP=N keeps only the newest N spool-*.dump files in BACKUP_DIR after a backup.
#
# With compose.prod.yml (pg_dump of the same major version as the server, from the
# postgres image; dumps land in ./backups or SPOOL_BACKUP_DIR):
#   docker compose -f compose.prod.yml --profile tools run --rm backup
#   docker compose -f compose.prod.yml --profile tools run --rm backup restore /backups/FILE
#
# Backup: pg_dump in custom format (compressed; pg_restore can pick objects from it).
# It reads one consistent snapshot while the platform keeps running, so schedule it
# (cron, a Kubernetes CronJob) as often as the jobs you can afford to lose. The file is
# written under a temporary name and renamed only once pg_restore can read it back.
#
# Restore procedure:
#   1. Stop everything that writes: api, workers, beat
#      (docker compose -f compose.prod.yml stop api worker-image worker-llm worker-cpu beat).
#   2. docker/backup.sh restore FILE   -- pg_restore --clean --if-exists in a single
#      transaction: the dumped objects are dropped and recreated, all or nothing.
#      Objects created after the dump (a newer migration) are left alone.
#   3. Start again with `up -d`: migrate brings the schema to the code's head. Jobs that
#      were queued or running at dump time are re-sent by the sweeper; messages still in
#      Redis for jobs the dump does not know are no-ops (the claim finds no row).
#   Use the same or a newer pg_restore than the pg_dump that wrote the file.
set -eu

usage() {
    sed -n '2,16p' "$0" >&2
    exit 2
}

die() {
    echo "backup.sh: $*" >&2
    exit 1
}

# libpq does not understand SQLAlchemy's "+driver" part of the scheme.
libpq_url() {
    [ -n "${DATABASE_URL:-}" ] || die "DATABASE_URL is not set"
    printf '%s\n' "$DATABASE_URL" | sed -E 's#^(postgres(ql)?)\+[A-Za-z0-9_]+://#\1://#'
}

backup() {
    url=$(libpq_url)
    dir=${BACKUP_DIR:-.}
    file=${1:-"$dir/spool-$(date -u +%Y%m%dT%H%M%SZ).dump"}
    mkdir -p "$(dirname "$file")"
    tmp="$file.partial"
    trap 'rm -f "$tmp"' EXIT INT TERM
    pg_dump --format=custom --compress=6 --file="$tmp" --dbname="$url"
    pg_restore --list "$tmp" >/dev/null || die "the dump just written is unreadable"
    mv "$tmp" "$file"
    trap - EXIT INT TERM
    echo "backup.sh: wrote $file ($(wc -c <"$file" | tr -d ' ') bytes)"
    if [ -n "${BACKUP_KEEP:-}" ]; then
        # Newest first; everything after the first BACKUP_KEEP goes. Our own file names
        # (spool-<time>.dump) have no spaces or newlines, so ls is safe here.
        # shellcheck disable=SC2012
        ls -1t "$dir"/spool-*.dump 2>/dev/null | tail -n "+$((BACKUP_KEEP + 1))" |
            while IFS= read -r old; do
                rm -f -- "$old" && echo "backup.sh: removed $old"
            done
    fi
}

restore() {
    [ $# -eq 1 ] || usage
    file=$1
    [ -r "$file" ] || die "cannot read $file"
    url=$(libpq_url)
    pg_restore --list "$file" >/dev/null || die "$file is not a pg_dump custom archive"
    # --no-owner/--no-privileges: the restoring role owns everything, so a dump restores
    # into another cluster whose roles differ.
    pg_restore --clean --if-exists --no-owner --no-privileges \
        --single-transaction --exit-on-error --dbname="$url" "$file"
    echo "backup.sh: restored $file"
}

check() {
    [ $# -eq 1 ] || usage
    pg_restore --list "$1"
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
    backup) [ $# -le 1 ] || usage; backup "$@" ;;
    restore) restore "$@" ;;
    check) check "$@" ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
