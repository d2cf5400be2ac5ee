#!/usr/bin/env bash
# make asan: build qes_billing with AddressSanitizer, install it, and run the
# pg_regress, isolation and TAP layers with libasan preloaded into the server
# (PostgreSQL itself is not instrumented; our code is).  Any ASan report
# fails the run.  The normal build is reinstalled afterwards.
set -uo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"
unset_seed_env

libasan=$(gcc -print-file-name=libasan.so)
[ -f "$libasan" ] || { echo "libasan not found (install gcc's libasan)"; exit 1; }
logdir=${QES_ASAN_LOGDIR:-/tmp/qes_billing-asan}
rm -rf "$logdir"; mkdir -p "$logdir"; chmod 777 "$logdir"

make -C "$src" -s clean >/dev/null
make -C "$src" -s COPT="-fsanitize=address -fno-omit-frame-pointer -O1" with_llvm=no >/dev/null || exit 1
make -C "$src" -s COPT="-fsanitize=address -fno-omit-frame-pointer -O1" with_llvm=no install >/dev/null || exit 1

export LD_PRELOAD="$libasan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:log_path=$logdir/asan:halt_on_error=1"
status=0
bash "$src/test/tools/test.sh" pg_regress || status=1
bash "$src/test/tools/test.sh" isolation || status=1
bash "$src/test/tools/test.sh" tap || status=1
unset LD_PRELOAD

make -C "$src" -s clean >/dev/null
build_and_install "$src"

reports=$(ls "$logdir"/asan.* 2>/dev/null | wc -l)
if [ "$reports" -gt 0 ]; then
  echo "AddressSanitizer reports:"; head -60 "$logdir"/asan.*
  status=1
fi
echo "asan: $reports reports; tests $( [ $status = 0 ] && echo passed || echo FAILED )"
exit $status
