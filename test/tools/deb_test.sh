#!/usr/bin/env bash
# The deb layer: the Debian package postgresql-15-qes-billing, installed on
# this machine, passes pg_regress.
#
#   1. make deb (.ci/deb.sh: META.json checked, the package built, lintian),
#      or the package in QES_DEB_FILE
#   2. its version is qes_billing.control's; it holds exactly the files
#      make install installs (plus its own docs and lintian overrides)
#   3. copies of those files that no package owns (make install's) are
#      removed, the package is installed, and every qes_billing file in
#      PostgreSQL's directories is shown to be the package's (dpkg -S, and
#      dpkg --verify finds none changed)
#   4. pg_regress (the REGRESS list, its last test zz_amcheck running amcheck
#      over every index) in a temporary instance of the system's server, from
#      a copy of the tests alone: no library or install script of the tree
#      is there to be found
#   5. the package is purged and the tree's build installed again (make
#      install), as the other layers expect; QES_DEB_KEEP=1 keeps the package
#
# Needs root (dpkg).  Exit status non-zero when any step failed.
set -uo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
. "$src/test/tools/common.sh"
unset_seed_env

start=$(date +%s)
pkg=postgresql-15-qes-billing
say() { echo "deb: $*"; }
fail() { echo "deb: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "installing the package needs root (dpkg -i); run as root"

version=$(sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" "$src/qes_billing.control")
pkglibdir=$(pg_config --pkglibdir)
sharedir=$(pg_config --sharedir)
bindir=$(pg_config --bindir)
docdir=$(pg_config --docdir)

# 1. the package
if [ -n "${QES_DEB_FILE:-}" ]; then
  deb=$QES_DEB_FILE
else
  bash "$src/.ci/deb.sh" || fail "make deb"
  deb=$(ls "$src"/build/deb/${pkg}_*.deb)
fi
[ -f "$deb" ] || fail "no package $deb"
built=$(date +%s)

# 2. its version and its files
deb_version=$(dpkg-deb -f "$deb" Version)
[ "${deb_version%-*}" = "$version" ] ||
  fail "package version $deb_version is not qes_billing.control's $version"
say "package $(basename "$deb"): version $deb_version = qes_billing.control $version"

tmp=$(mktemp -d /tmp/qes_billing-deb-test.XXXXXX)
restored=0
restore() {
  if [ "$restored" = 0 ] && [ "${QES_DEB_KEEP:-}" != 1 ]; then
    restored=1
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      apt-get purge -y -qq -o DPkg::Lock::Timeout=300 "$pkg" >/dev/null 2>&1 ||
        echo "deb: could not purge $pkg" >&2
    fi
    build_and_install "$src" || echo "deb: make install of the tree failed" >&2
  fi
  rm -rf "$tmp"
}
trap restore EXIT

build_and_install "$src" >/dev/null || fail "make install of the tree"
make -C "$src" -s install DESTDIR="$tmp/make-install" >/dev/null || fail "make install DESTDIR"
(cd "$tmp/make-install" && find . ! -type d | sed 's|^\.||' | sort) > "$tmp/make-install.list"
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | sed 's|^\.||' |
  grep -v -e "^/usr/share/doc/$pkg/" -e "^/usr/share/lintian/overrides/$pkg\$" | sort > "$tmp/deb.list"
if ! diff -u "$tmp/make-install.list" "$tmp/deb.list"; then
  fail "the package's files (+) are not make install's (-)"
fi
say "the package holds make install's $(wc -l < "$tmp/make-install.list") files (and its docs and lintian overrides)"

# 3. install it, in place of make install's unowned copies
# this extension's files in PostgreSQL's directories (not those of another
# extension whose name begins with qes_billing)
qes_files() {
  find "$pkglibdir" -maxdepth 1 -name qes_billing.so
  find "$pkglibdir/bitcode" -maxdepth 1 -name qes_billing.index.bc 2>/dev/null
  find "$pkglibdir/bitcode/qes_billing" ! -type d 2>/dev/null
  find "$sharedir/extension" -maxdepth 1 \( -name qes_billing.control -o -name 'qes_billing--*.sql' \)
  find "$bindir" -maxdepth 1 -name 'qes_billing_*'
  find "$docdir/extension" -maxdepth 1 -name 'qes_billing_*' 2>/dev/null
}
# ... and every file make install installs (the tree may build more than
# one extension)
our_files() { { cat "$tmp/make-install.list"; qes_files; } | sort -u; }
if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
  say "purging the $pkg installed before ($(dpkg-query -W -f='${Version}' "$pkg"))"
  apt-get purge -y -qq -o DPkg::Lock::Timeout=300 "$pkg" >/dev/null 2>&1 || fail "purging $pkg"
fi
removed=0
while read -r f; do
  [ -e "$f" ] || continue
  if ! dpkg -S "$f" >/dev/null 2>&1; then rm -f "$f"; removed=$((removed + 1)); fi
done < <(our_files)
find "$pkglibdir/bitcode/qes_billing" -depth -type d -empty -delete 2>/dev/null
say "removed $removed files no package owns (make install's)"
apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "$(realpath "$deb")" \
  >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log"; fail "installing $deb"; }
# every file make install installs is there and the package's; another
# qes_billing file (one this tree does not install, e.g. an older build's) is
# named: it was removed above, so a make install from another tree put it back
owned=0
while read -r f; do
  [ -e "$f" ] || fail "$f is missing"
  owner=$(dpkg -S "$f" 2>/dev/null | cut -d: -f1)
  [ "$owner" = "$pkg" ] ||
    fail "$f is not the package's (owner: ${owner:-none}; a make install from another tree meanwhile?)"
  owned=$((owned + 1))
done < "$tmp/make-install.list"
while read -r f; do
  grep -qxF "$f" "$tmp/make-install.list" && continue
  dpkg -S "$f" >/dev/null 2>&1 || say "warning: $f is no package's and not this tree's (a make install from another tree meanwhile?)"
done < <(qes_files)
changed=$(dpkg --verify "$pkg")
[ -z "$changed" ] || fail "installed files differ from the package's: $changed"
say "installed: $owned files of this tree's in PostgreSQL's directories, all $pkg's, none changed"
say "$(dpkg -S "$pkglibdir/qes_billing.so")"
"$bindir/qes_billing_setup" --help >/dev/null || fail "qes_billing_setup --help"

# 4. pg_regress against the installed files, from a copy of the tests alone
# (the files git does not ignore: no build products)
mkdir -p "$tmp/tree"
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$src" && git ls-files -z --cached --others --exclude-standard |
     while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
     tar --null -T - -cf -) | tar -C "$tmp/tree" -xf -
else
  tar -C "$src" --exclude=./.git --exclude=./build --exclude='./tmp_check*' -cf - . | tar -C "$tmp/tree" -xf -
  (cd "$tmp/tree" && make -s clean >/dev/null)
fi
chown -R "$PGUSER_OS" "$tmp"
built_files=$(cd "$tmp/tree" && find . \( -name '*.so' -o -name '*.o' -o -name '*.bc' -o -name "qes_billing--$version.sql" \) ! -path './sql/*')
[ -z "$built_files" ] || fail "build products in the test copy: $built_files"
regress_start=$(date +%s)
regress_ok=1
(cd "$tmp/tree" && as_pg make -s installcheck ISOLATION= TAP_TESTS=) > "$tmp/regress.out" 2>&1 || regress_ok=0
cat "$tmp/regress.out"
# the package's files must still be the ones tested: a make install from
# another tree meanwhile (the directories are the system's) would overwrite them
if [ "$regress_ok" = 0 ] && [ -s "$tmp/tree/regression.diffs" ]; then
  head -300 "$tmp/tree/regression.diffs"
fi
changed=$(dpkg --verify "$pkg")
[ -z "$changed" ] || fail "the package's files were changed while pg_regress ran (a make install elsewhere?): $changed"
[ "$regress_ok" = 1 ] || fail "pg_regress against the installed package"
grep -Eq 'zz_amcheck +\.\.\. ok' "$tmp/regress.out" || fail "amcheck (zz_amcheck) did not pass"
say "pg_regress: passed against the installed package, amcheck (zz_amcheck) included, in $(( $(date +%s) - regress_start )) s"

restore
say "package purged and the tree's build installed again"
say "layer time $(( $(date +%s) - start )) s (package $(( built - start )) s)"
