#!/usr/bin/env bash
# The whole system through `powermail up`, driven by ppblast: the PowerMail side of the
# issue #8 workloads. Not a test; figures go to bench/RESULTS.md by hand.
#
#   bench/system.sh [K...]        (default: 1 2)   — 2 backends, release build
#
# Per K: SMTP 20 conns x 4 KiB x 1 rcpt; 20 x 64 KiB; 20 x 4 KiB x 10 rcpts; then POP:
# empty-mailbox logins (USER, PASS, STAT, QUIT), and draining 20 mailboxes of 100 x 4 KiB
# (RETR + DELE all).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bins
B=target/release
MSGS=${MSGS:-4000}
for K in "${@:-1 2}"; do
  for k in $K; do
    D=/tmp/pm-system-$k; rm -rf "$D"; mkdir -p "$D"
    cat > "$D/up.toml" <<TOML
smtp_listen = "127.0.0.1:12525"
pop_listen = "127.0.0.1:11110"
backend_base_port = 17100
pplistener_admin = "127.0.0.1:18010"
smtp_admin = "127.0.0.1:18025"
pop_admin = "127.0.0.1:18110"
TOML
    # Mailboxes first (the supervisor creates the userbase; ppadmin adds to it).
    $B/powermail up --data "$D/var" --config "$D/up.toml" --backends 2 --replicas "$k" > "$D/up.log" 2>&1 &
    UP=$!
    trap 'kill $UP 2>/dev/null || true' EXIT
    for _ in $(seq 200); do grep -q "Ctrl-C" "$D/up.log" && break; sleep 0.1; done
    : > "$D/rcpts"; : > "$D/logins"; : > "$D/drain"
    for i in $(seq 0 99); do
      $B/ppadmin --data "$D/var" user add "u$i@bench.test" --password pw >/dev/null
      echo "u$i@bench.test" >> "$D/rcpts"
    done
    # 200 logins for 20 connections: no two concurrent sessions share a mailbox (IN-USE).
    for i in $(seq 0 199); do
      $B/ppadmin --data "$D/var" user add "empty$i@bench.test" --password pw >/dev/null
      echo "empty$i@bench.test:pw" >> "$D/logins"
    done
    for i in $(seq 0 19); do
      $B/ppadmin --data "$D/var" user add "drain$i@bench.test" --password pw >/dev/null
      echo "drain$i@bench.test:pw" >> "$D/drain"
    done
    sleep 2   # the frontends' userbase caches and health checks settle
    echo "== K=$k: $(nproc) CPUs, $(uname -r)"
    $B/ppblast smtp --server 127.0.0.1:12525 --to-file "$D/rcpts" --count "$MSGS" --connections 20 --size 4096 --quiet
    $B/ppblast smtp --server 127.0.0.1:12525 --to-file "$D/rcpts" --count $((MSGS / 2)) --connections 20 --size 65536 --quiet
    $B/ppblast smtp --server 127.0.0.1:12525 --to-file "$D/rcpts" --count $((MSGS / 4)) --connections 20 --size 4096 --rcpts 10 --quiet
    $B/ppblast pop --server 127.0.0.1:11110 --login-file "$D/logins" --sessions "$MSGS" --connections 20 --quiet
    # 20 mailboxes x 100 messages, then drain them with 20 sessions at once.
    cut -d: -f1 "$D/drain" > "$D/drain-rcpts"
    $B/ppblast smtp --server 127.0.0.1:12525 --to-file "$D/drain-rcpts" --count 2000 --connections 20 --size 4096 --quiet > /dev/null
    $B/ppblast pop --server 127.0.0.1:11110 --login-file "$D/drain" --sessions 20 --connections 20 --retr --dele --quiet
    kill $UP; wait $UP 2>/dev/null || true
    trap - EXIT
  done
done
