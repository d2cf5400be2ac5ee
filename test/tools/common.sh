# Shared helpers for the developer scripts (sourced).
PGBIN=${PGBIN:-$(pg_config --bindir)}
export PATH="$PGBIN:$PATH"

# initdb refuses to run as root: cluster steps run as this user when root.
PGUSER_OS=${PGUSER_OS:-postgres}

as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$PGUSER_OS" -- env PATH="$PATH" "$@"
  else
    "$@"
  fi
}

# The seed's variables must not leak from the developer's shell into tests.
unset_seed_env() {
  unset STRIPE_TEST_SECRET_KEY STRIPE_TEST_PUBLISHABLE_KEY STRIPE_TEST_WEBHOOK_SECRET \
        STRIPE_LIVE_SECRET_KEY STRIPE_LIVE_PUBLISHABLE_KEY STRIPE_LIVE_WEBHOOK_SECRET \
        QES_ENVIRONMENT QES_BASE_URL
}

build_and_install() {
  make -C "$1" -s >/dev/null
  if [ "$(id -u)" = 0 ]; then
    make -C "$1" -s install >/dev/null
  elif ! make -C "$1" -s install >/dev/null 2>&1; then
    echo "cannot install into $(pg_config --pkglibdir); run: sudo make install" >&2
    return 1
  fi
}

# init_cluster DIR PORT DB LISTEN [extra postgresql.conf lines on stdin]:
# a cluster in DIR/data with qes_billing preloaded, its socket in DIR.
init_cluster() {
  local dir=$1 port=$2 db=$3 listen=$4
  as_pg initdb -D "$dir/data" -A trust -U postgres >/dev/null
  { cat <<CONF
port = $port
listen_addresses = '$listen'
unix_socket_directories = '$dir'
shared_preload_libraries = 'qes_billing'
qes_billing.database = '$db'
CONF
    cat; } | as_pg sh -c "cat >> '$dir/data/postgresql.conf'"
}
