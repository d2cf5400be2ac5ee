#!/usr/bin/env bash
# make test: every test layer -- pg_regress, isolation, TAP, pytest, and
# pg_regress + isolation again with the server under valgrind.
# Each layer runs even when an earlier one failed; the exit status is
# non-zero when any layer failed or ran no test.
set -uo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"
unset_seed_env

bash "$src/test/tools/deps.sh" || exit 1
build_and_install "$src" || exit 1

# Cluster-making layers run as an unprivileged user in a copy of the tree
# when we are root (initdb refuses root).
if [ "$(id -u)" = 0 ]; then
  work=${QES_TEST_WORKDIR:-/tmp/qes_billing-test}
  rm -rf "$work"; mkdir -p "$work"
  tar -C "$src" --exclude=.git --exclude='tmp_check*' -cf - . | tar -C "$work" -xf -
  chown -R "$PGUSER_OS" "$work"
else
  work=$src
fi

only=${1:-}    # optional: run one layer only (pg_regress, isolation, tap, pytest, valgrind)
passed=0; failed=0; failed_layers=()
layer() {
  local name=$1; shift
  if [ -n "$only" ] && [ "$only" != "$name" ]; then return 0; fi
  echo "=== $name"
  if "$@"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1)); failed_layers+=("$name")
  fi
}

show_diffs() {
  for f in "$work/regression.diffs" "$work/test/isolation/output/regression.diffs"; do
    if [ -s "$f" ]; then echo "--- $f"; head -300 "$f"; fi
  done
}

in_work() { (cd "$work" && as_pg "$@"); }

layer pg_regress in_work make -s installcheck ISOLATION= TAP_TESTS=
[ -s "$work/regression.diffs" ] && show_diffs
layer isolation in_work make -s installcheck REGRESS= TAP_TESTS=
[ -s "$work/test/isolation/output/regression.diffs" ] && show_diffs
layer tap in_work make -s installcheck REGRESS= ISOLATION= "PROVE_FLAGS=-I ./test/t --timer"
layer pytest python3 -m pytest -q -p no:cacheprovider "$src/test/python"
layer deb bash "$src/test/tools/deb_test.sh"
layer valgrind bash "$src/test/tools/valgrind.sh"

echo
[ $failed -gt 0 ] && echo "failed layers: ${failed_layers[*]}"
echo "layers: $passed passed, $failed failed"
[ $failed -eq 0 ]
