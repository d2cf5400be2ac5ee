#!/usr/bin/env bash
# make deb: the Debian binary package postgresql-15-qes-billing.
#
# The packaging sources live in .ci/debian (the repository has no top-level
# debian/).  This script copies the source tree into a temporary directory,
# puts .ci/debian there as debian/ with a changelog whose version is
# qes_billing.control's default_version (revision QES_DEB_REVISION, 1), makes
# debian/control from control.in (pg_buildext updatecontrol), builds with
# dpkg-buildpackage -b and leaves the packages in build/deb/.  lintian then
# checks them; an error fails the build.  META.json's version is checked
# against the control file first.
#
# Environment: QES_DEB_REF builds a commit (git archive) instead of the
# working tree, QES_DEB_REVISION (1), QES_DEB_DIST (bookworm),
# QES_DEB_OUT (build/deb), QES_DEB_KEEP_TREE=1 keeps the build directory,
# SOURCE_DATE_EPOCH (else the last commit's time) dates the changelog.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"

start=$(date +%s)
revision=${QES_DEB_REVISION:-1}
dist=${QES_DEB_DIST:-bookworm}
out=${QES_DEB_OUT:-$src/build/deb}

for tool in dpkg-buildpackage dh pg_buildext lintian; do
  command -v "$tool" >/dev/null || {
    echo "deb: $tool is missing (bash test/tools/deps.sh installs the build dependencies)" >&2; exit 1; }
done

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct ${QES_DEB_REF:-} 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qes_billing-deb.XXXXXX")
cleanup() { [ "${QES_DEB_KEEP_TREE:-}" = 1 ] && echo "deb: build directory kept: $tmp" || rm -rf "$tmp"; }
trap cleanup EXIT
tree=$tmp/tree
mkdir -p "$tree"

# the source tree: tracked and untracked files that git does not ignore (no
# build products); without git, everything but them; with QES_DEB_REF, that
# commit's tree (a release built from a tag, not from a working tree)
if [ -n "${QES_DEB_REF:-}" ]; then
  git archive --format=tar "$QES_DEB_REF" | tar -C "$tree" -xf -
elif git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -C "$tree" -xf -
else
  tar --exclude=./.git --exclude=./build --exclude='./tmp_check*' --exclude='*.o' \
      --exclude='*.bc' --exclude='*.so' --exclude='./qes_billing--*.sql' \
      -cf - . | tar -C "$tree" -xf -
fi

# from here on everything comes from the copy
version=$(sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" "$tree/qes_billing.control")
[ -n "$version" ] || { echo "deb: no default_version in qes_billing.control" >&2; exit 1; }
python3 "$tree/test/tools/check_meta.py"
mv "$tree" "$tmp/qes-billing-$version"
tree=$tmp/qes-billing-$version
rm -rf "$tree/debian"
cp -a "$tree/.ci/debian" "$tree/debian"
rm -f "$tree/debian/changelog.in"
sed -e "s/@VERSION@/$version/g" -e "s/@REVISION@/$revision/g" -e "s/@DISTRIBUTION@/$dist/g" \
    -e "s/@DATE@/$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")/g" \
    "$tree/.ci/debian/changelog.in" > "$tree/debian/changelog"

echo "deb: building postgresql-15-qes-billing $version-$revision in $tree"
(cd "$tree" && pg_buildext updatecontrol) >"$tmp/build.log" 2>&1
if ! (cd "$tree" && dpkg-buildpackage -us -uc -b) >>"$tmp/build.log" 2>&1; then
  tail -60 "$tmp/build.log"
  echo "deb: dpkg-buildpackage failed (log above)" >&2
  exit 1
fi

mkdir -p "$out"
rm -f "$out"/*.deb "$out"/*.changes "$out"/*.buildinfo "$out"/lintian.txt
cp "$tmp"/*.deb "$tmp"/*.changes "$tmp"/*.buildinfo "$out/"
changes=$(ls "$out"/*.changes)
deb=$(ls "$out"/postgresql-15-qes-billing_*.deb)

# lintian over the .changes: the packages and the .buildinfo (as nobody
# when root and nobody can read them: lintian advises against root)
lint=(lintian --fail-on error --info --display-info "$changes")
if [ "$(id -u)" = 0 ] && runuser -u nobody -- test -r "$changes" 2>/dev/null; then
  lint=(runuser -u nobody -- "${lint[@]}")
fi
lintian_rc=0
"${lint[@]}" >"$out/lintian.txt" 2>&1 || lintian_rc=$?
if [ -s "$out/lintian.txt" ]; then sed 's/^/  /' "$out/lintian.txt"; fi
printf 'deb: lintian: %s errors, %s warnings, %s info, %s pedantic\n' \
  "$(grep -c '^E: ' "$out/lintian.txt")" "$(grep -c '^W: ' "$out/lintian.txt")" \
  "$(grep -c '^I: ' "$out/lintian.txt")" "$(grep -c '^P: ' "$out/lintian.txt")"

echo "deb: $deb ($(stat -c %s "$deb") bytes, built in $(( $(date +%s) - start )) s)"
[ "$lintian_rc" = 0 ] || { echo "deb: lintian failed" >&2; exit 1; }
