#!/usr/bin/env bash
# make valgrind: run the pg_regress and isolation layers with the server
# under valgrind memcheck.  A private bindir holds a `postgres` wrapper that
# starts the real server under valgrind (every backend and the worker are
# forked from it, so they run under valgrind too); initdb and psql run
# natively.  Errors in frames of qes_billing.so fail the run; reports that
# only involve PostgreSQL's own code are counted but not ours to fix.
# (AddressSanitizer cannot be preloaded into Debian's uninstrumented server:
# glibc's bindtextdomain deadlocks under libasan at start-up.)
set -uo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"
unset_seed_env

real=$(pg_config --bindir)
wrap=${QES_VALGRIND_DIR:-/tmp/qes_billing-valgrind}
rm -rf "$wrap"; mkdir -p "$wrap/bin" "$wrap/logs"; chmod 777 "$wrap/logs"
for f in "$real"/*; do ln -s "$f" "$wrap/bin/$(basename "$f")"; done
rm "$wrap/bin/postgres"
cat > "$wrap/bin/postgres" <<WRAP
#!/bin/sh
case "\$1" in -V|--version|--boot|--single|-C|--describe-config) exec "$real/postgres" "\$@";; esac
exec valgrind --quiet --tool=memcheck --trace-children=no --track-origins=no \\
  --error-limit=no --num-callers=30 --log-file="$wrap/logs/vg.%p" "$real/postgres" "\$@"
WRAP
chmod 755 "$wrap/bin/postgres"

build_and_install "$src" || exit 1
status=0
if [ "$(id -u)" = 0 ]; then
  work=/tmp/qes_billing-valgrind/work; rm -rf "$work"; mkdir -p "$work"
  tar -C "$src" --exclude=.git --exclude='tmp_check*' -cf - . | tar -C "$work" -xf -
  chown -R "$PGUSER_OS" "$work"
else
  work=$src
fi
# pg_regress finds initdb and postgres through --bindir
(cd "$work" && as_pg make -s installcheck ISOLATION= TAP_TESTS= "REGRESS_OPTS=--temp-instance=./tmp_check_regress --temp-config=test/regress.conf --dbname=contrib_regression --bindir=$wrap/bin") || status=1
(cd "$work" && as_pg make -s installcheck REGRESS= TAP_TESTS= "ISOLATION_OPTS=--temp-instance=./tmp_check_iso --temp-config=test/regress.conf --load-extension=qes_billing --inputdir=test/isolation --outputdir=test/isolation/output --dbname=contrib_regression --bindir=$wrap/bin") || status=1

ours=$(grep -l "qes_billing.so" "$wrap"/logs/vg.* 2>/dev/null | wc -l)
total=$(grep -l "ERROR SUMMARY\|Invalid\|uninitialised" "$wrap"/logs/vg.* 2>/dev/null | wc -l)
if [ "$ours" -gt 0 ]; then
  echo "valgrind reports in qes_billing code:"
  grep -l "qes_billing.so" "$wrap"/logs/vg.* | head -3 | xargs head -80
  status=1
fi
echo "valgrind: $ours process logs with errors in qes_billing code, $total logs with any report"
exit $status
