#!/usr/bin/env bash
# make test: every test layer -- pg_regress, isolation, TAP, pytest, and
# pg_regress + isolation again with the server under valgrind.
# Each layer runs even when an earlier one failed; the exit status is
# non-zero when any layer failed or ran no test.  Each layer prints how many
# of its tests were skipped, and why (TAP: prove --directives shows every
# skip and TODO; pytest: -rs); pg_regress, isolation and valgrind cannot
# skip a test and print 0.
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
passed=0; failed=0; failed_layers=(); skip_counts=()
logs=$(mktemp -d /tmp/qes_billing-test-logs.XXXXXX)
layer() {
  local name=$1; shift
  if [ -n "$only" ] && [ "$only" != "$name" ]; then return 0; fi
  echo "=== $name"
  if "$@" 2>&1 | tee "$logs/$name.log"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1)); failed_layers+=("$name")
  fi
  count_skips "$name" "$logs/$name.log"
}

# count_skips LAYER LOG: the layer's skipped tests, with their reasons
count_skips() {
  local name=$1 log=$2 n=0 reasons=''
  case $name in
    tap)
      # "ok 7 # skip why" (a skipped subtest) and "t/x.pl .. skipped: why" (a file)
      reasons=$(grep -aiE '^(not )?ok [0-9]+.*# skip|\.\. skipped' "$log")
      n=$(printf '%s' "$reasons" | grep -c . || true)
      local todo
      todo=$(grep -aE '^not ok [0-9]+.*# TODO' "$log" | grep -c . || true)
      [ "$todo" -gt 0 ] && reasons+=$'\n'"$todo TODO tests failed (not counted as failures):"$'\n'"$(grep -aE '^not ok [0-9]+.*# TODO' "$log")"
      ;;
    pytest)
      # -rs: "SKIPPED [1] file:line: why"; the summary line: "N skipped"
      n=$(grep -aE '[0-9]+ (passed|failed|errors?|skipped)\b.* in [0-9.]+s' "$log" | tail -1 \
            | grep -oE '[0-9]+ skipped' | grep -oE '^[0-9]+' || true)
      n=${n:-0}
      reasons=$(grep -a '^SKIPPED' "$log")
      ;;
  esac
  skip_counts+=("$name $n")
  echo "--- $name: $n skipped"
  [ -n "$reasons" ] && printf '%s\n' "$reasons" | sed "s/^/--- $name skipped: /"
  return 0
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
layer tap in_work make -s installcheck REGRESS= ISOLATION= "PROVE_FLAGS=-I ./test/t --timer --directives"
layer pytest python3 -m pytest -q -rs -p no:cacheprovider "$src/test/python"
layer deb bash "$src/test/tools/deb_test.sh"
layer valgrind bash "$src/test/tools/valgrind.sh"

echo
[ ${#skip_counts[@]} -gt 0 ] && echo "skipped tests per layer: $(IFS=,; echo "${skip_counts[*]}" | sed 's/,/, /g')"
[ $failed -gt 0 ] && echo "failed layers: ${failed_layers[*]}"
rm -rf "$logs"
echo "layers: $passed passed, $failed failed"
[ $failed -eq 0 ]
