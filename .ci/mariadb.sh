#!/usr/bin/env bash
# Start/stop a throw-away MariaDB for the userbase test suite (CI and local runs).
#
# Why: the userbase has one test suite run against SQLite *and* MySQL/MariaDB; this script
# gives the MySQL half a real server without touching any system service.
#
#   .ci/mariadb.sh start    install mariadb-server if missing, start it, print the env var
#   .ci/mariadb.sh stop     shut it down (data dir kept)
#   .ci/mariadb.sh status   "running" / "stopped" (exit 0 / 1)
#
# Knobs: PM_MARIADB_DIR (default /tmp/pm-mariadb), PM_MARIADB_PORT (default 3306),
# PM_MARIADB_NO_TLS=1 (no certificates; the fault suite's private instance),
# PM_MARIADB_BIND (default 127.0.0.1; the topology suite's database host binds its own address).
# Idempotent: `start` while running only prints the export lines again.
#
# TLS: if `openssl` is available, a throw-away CA and a server certificate for 127.0.0.1
# are made under $PM_MARIADB_DIR/tls and the server accepts TLS with them; `start` then
# also prints PM_TEST_MYSQL_TLS_CA (used by the `mysql-tls` feature's test).
set -euo pipefail

D="${PM_MARIADB_DIR:-/tmp/pm-mariadb}"
PORT="${PM_MARIADB_PORT:-3306}"
BIND="${PM_MARIADB_BIND:-127.0.0.1}"
SOCK="$D/run/mysqld.sock"
TLS="$D/tls"
WAIT_SECONDS=30

admin() { mariadb-admin --no-defaults --socket="$SOCK" -uroot "$@"; }

is_running() { admin ping >/dev/null 2>&1; }

print_env() {
    echo "export PM_TEST_MYSQL_URL=mysql://root@127.0.0.1:${PORT}/powermail_test"
    if [ -f "$TLS/ca.pem" ]; then
        echo "export PM_TEST_MYSQL_TLS_CA=$TLS/ca.pem"
    fi
}

# A CA and a server certificate (SAN IP:127.0.0.1) for TLS tests; never for production.
make_certs() {
    [ -f "$TLS/server-cert.pem" ] && return 0
    command -v openssl >/dev/null 2>&1 || return 0
    mkdir -p "$TLS"
    (
        cd "$TLS"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=powermail test CA" \
            -keyout ca-key.pem -out ca.pem
        openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
            -keyout server-key.pem -out server.csr
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext.cnf
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 3650 \
            -extfile ext.cnf -out server-cert.pem
    ) >"$D/tls.log" 2>&1
}

install_if_missing() {
    if ! command -v mariadbd >/dev/null 2>&1; then
        echo "mariadbd not found: installing mariadb-server" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server mariadb-client >&2
    fi
}

start() {
    install_if_missing
    if is_running; then
        echo "mariadb already running (datadir $D)" >&2
        print_env
        return 0
    fi
    mkdir -p "$D/data" "$D/run"
    if [ ! -d "$D/data/mysql" ]; then
        # `normal` root authentication: root with no password may log in over TCP,
        # which is what the mysql crate uses (it does not do unix_socket auth here).
        mariadb-install-db --no-defaults --user=root --datadir="$D/data" \
            --auth-root-authentication-method=normal --skip-test-db >"$D/install.log" 2>&1
    fi
    [ "${PM_MARIADB_NO_TLS:-}" = 1 ] || make_certs
    local tls_args=()
    if [ -f "$TLS/server-cert.pem" ]; then
        tls_args=(--ssl-ca="$TLS/ca.pem" --ssl-cert="$TLS/server-cert.pem" --ssl-key="$TLS/server-key.pem")
    fi
    # setsid: the server must outlive this script and not get its terminal's signals.
    setsid mariadbd --no-defaults --user=root --datadir="$D/data" --socket="$SOCK" \
        --pid-file="$D/run/mysqld.pid" --port="$PORT" --bind-address="$BIND" \
        --log-error="$D/err.log" "${tls_args[@]}" </dev/null >/dev/null 2>&1 &
    local i
    for ((i = 0; i < WAIT_SECONDS * 10; i++)); do
        if is_running; then
            echo "mariadb started on ${BIND}:${PORT} (datadir $D)" >&2
            print_env
            return 0
        fi
        sleep 0.1
    done
    echo "mariadb did not answer ping within ${WAIT_SECONDS}s; see $D/err.log" >&2
    tail -n 20 "$D/err.log" >&2 || true
    return 1
}

stop() {
    if is_running; then
        admin shutdown
        # shutdown returns before the process has gone; wait so a restart can bind the port.
        local i
        for ((i = 0; i < WAIT_SECONDS * 10; i++)); do
            [ -e "$D/run/mysqld.pid" ] || break
            sleep 0.1
        done
        echo "mariadb stopped" >&2
    else
        echo "mariadb not running" >&2
    fi
}

status() {
    if is_running; then
        echo "running (127.0.0.1:${PORT}, datadir $D)"
    else
        echo "stopped"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
