#!/usr/bin/env bash
# Install everything qes_billing needs to build and test, on Debian 12.
# As root it installs; otherwise it prints the exact command to run.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)

# gdb: TAP 009 holds the extension-recreate commit window open with it
DEBS=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libcurl4-openssl-dev libssl-dev
      libipc-run-perl make gcc python3 python3-pip ca-certificates valgrind gdb
      postgresql-15-plproxy pgbouncer)

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "deps: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "deps: missing Debian packages; run as root:"
    echo "  apt-get update && apt-get install -y ${missing[*]}"
    exit 1
  fi
fi

# Prometheus tooling for test/python/test_prometheus.py: Debian's
# postgres exporter (run by the test itself, on a free port) and promtool
# (package prometheus).  Without recommends: no node exporter comes along.
MONITORING_DEBS=(prometheus-postgres-exporter prometheus)
missing=()
for p in "${MONITORING_DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "deps: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "deps: missing Debian packages; run as root:"
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
    exit 1
  fi
fi

# Debian packaging for make deb and the deb layer (test/tools/deb_test.sh):
# debhelper with PostgreSQL's pg_buildext/dh pgxs, lintian.  Without
# recommends (lintian's would bring a mail setup and more).
PACKAGING_DEBS=(debhelper postgresql-server-dev-all dpkg-dev fakeroot lintian)
missing=()
for p in "${PACKAGING_DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "deps: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "deps: missing Debian packages; run as root:"
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
    exit 1
  fi
fi

# Python test dependencies (pytest, psycopg, stripe for the signature oracle,
# aiosmtpd for the SMTP server notifications are delivered to, PyYAML to
# read the exporter's queries file)
if ! python3 -c 'import pytest, psycopg, stripe, aiosmtpd, yaml, hypothesis' 2>/dev/null; then
  echo "deps: installing Python packages from test/python/requirements.txt"
  python3 -m pip install -q --disable-pip-version-check -r "$here/test/python/requirements.txt" \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages \
         -r "$here/test/python/requirements.txt"
fi
# stripe-mock (Stripe's official mock server) for the handler tests, built
# from the Go module proxy into a cache directory
STRIPE_MOCK_VERSION=v0.203.0
tools=${QES_TOOLS_DIR:-$HOME/.cache/qes_billing/bin}
if [ ! -x "$tools/stripe-mock" ]; then
  if ! command -v go >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null
    else
      echo "deps: Go is needed to build stripe-mock; run as root: apt-get install -y golang-go"; exit 1
    fi
  fi
  echo "deps: building stripe-mock $STRIPE_MOCK_VERSION"
  mkdir -p "$tools"
  GOBIN="$tools" go install "github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION"
fi
# pgxn_meta, PGXN's META.json validator (a crate), for make deb's META.json
# check (test/tools/check_meta.py); skipped without cargo, the check then
# does its own spec checks only
PGXN_META_VERSION=0.7.0
if [ ! -x "$tools/pgxn_meta" ] && command -v cargo >/dev/null; then
  echo "deps: building pgxn_meta $PGXN_META_VERSION"
  mkdir -p "$tools"
  root=$(mktemp -d)
  cargo install -q --locked --root "$root" pgxn_meta --version "$PGXN_META_VERSION" &&
    cp "$root/bin/pgxn_meta" "$tools/"
  rm -rf "$root"
fi
echo "deps: ok"
