#!/usr/bin/env bash
# Install everything qes_billing needs to build and test, on Debian 12.
# As root it installs; otherwise it prints the exact command to run.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)

DEBS=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libcurl4-openssl-dev libssl-dev
      libipc-run-perl make gcc python3 python3-pip ca-certificates valgrind)

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

# Python test dependencies (pytest, psycopg, stripe for the signature oracle)
if ! python3 -c 'import pytest, psycopg, stripe' 2>/dev/null; then
  echo "deps: installing Python packages from test/python/requirements.txt"
  python3 -m pip install -q --disable-pip-version-check -r "$here/test/python/requirements.txt" \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages \
         -r "$here/test/python/requirements.txt"
fi
echo "deps: ok"
