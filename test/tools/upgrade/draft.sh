#!/usr/bin/env bash
# Draft the upgrade script sql/qes_billing--A--B.sql (docs/operations.md,
# "Upgrades"): builds and installs the tree, starts a throwaway cluster,
# creates the extension at A in one database and at B in another, and runs
# draft.py with the hand-written parts in test/tools/upgrade/A--B/.  The
# draft replaces sql/qes_billing--A--B.sql and is installed; then
# test/t/011_upgrade.pl is the check:
#
#   bash test/tools/upgrade/draft.sh 0.1 0.2
#   make installcheck REGRESS= ISOLATION= PROVE_TESTS=test/t/011_upgrade.pl   # (as in test/tools/test.sh)
#
# A released version's upgrade script is never drafted again.
set -euo pipefail
src=$(cd "$(dirname "$0")/../../.." && pwd)
. "$src/test/tools/common.sh"

A=${1:?usage: $0 FROM_VERSION TO_VERSION}
B=${2:?usage: $0 FROM_VERSION TO_VERSION}
parts=$src/test/tools/upgrade/$A--$B
out=$src/sql/qes_billing--$A--$B.sql
[ -d "$parts" ] || { echo "no hand-written parts in $parts" >&2; exit 1; }

DIR=${QES_UPGRADE_DIR:-/tmp/qes_billing-upgrade}
PORT=${QES_UPGRADE_PORT:-55439}

build_and_install "$src"
as_pg pg_ctl -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown "$PGUSER_OS" "$DIR"
init_cluster "$DIR" "$PORT" postgres '' </dev/null
as_pg pg_ctl -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
trap 'as_pg pg_ctl -D "$DIR/data" -m fast -w stop >/dev/null' EXIT

export PGHOST=$DIR PGPORT=$PORT PGUSER=postgres
for v in "$A" "$B"; do
  as_pg env PGHOST="$DIR" PGPORT="$PORT" psql -X -q -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE DATABASE \"qes_$v\"" -c "\\c \"qes_$v\"" -c "CREATE EXTENSION qes_billing VERSION '$v'"
done
as_pg env PGHOST="$DIR" PGPORT="$PORT" PGUSER=postgres python3 "$src/test/tools/upgrade/draft.py" "$A" "$B" "$parts" \
  > "$DIR/draft.sql"
cp "$DIR/draft.sql" "$out"
build_and_install "$src"
echo "wrote $out ($(wc -l < "$out") lines); installed"
