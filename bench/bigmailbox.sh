#!/usr/bin/env bash
# Big mailboxes (issue #13 section 2, issue #14 "Big mailboxes"): the PowerMail side only.
# Not a test; figures go to bench/RESULTS.md by hand.
#
#   bench/bigmailbox.sh            env: MSGS=4000 (per SMTP round), ROUNDS=2, SESSIONS=200,
#                                       PROFILE=release (or debug: target/debug, opt-level 1)
#
# `powermail up` with 2 backends and K=2. Three mailboxes:
#   big@     100,000 messages of 4 KiB on both backends, quota 100 GB (never reached)
#   empty@   no messages, no quota
#   pop50k@  50,000 messages of 4 KiB on both backends
# The stored messages are hard links made directly in each backend's store while it is
# stopped (ext4: at most 65,000 links per inode, so one body per 50,000 links).
#   emptyq@  no messages, a quota of 100 GB
# 1. SMTP, 20 connections x 4 KiB x 1 rcpt, A B C A B C: empty@ without quota, big@ with one
#    (every RCPT asks each backend for USAGE; before the index it LISTed the mailbox), and
#    emptyq@ (the quota's cost without the big directory's). A warm-up of 200 messages to
#    each first, so that the one walk that builds big@'s index is not in round 1.
# 2. POP, one connection, sessions of USER, PASS, STAT, UIDL, QUIT on pop50k@: p50.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
  cargo build --release -q --workspace --bins
else
  cargo build -q --workspace --bins
fi
B=$PWD/target/$PROFILE
D=/tmp/pm-bigmailbox
MSGS=${MSGS:-4000}; ROUNDS=${ROUNDS:-2}; SESSIONS=${SESSIONS:-200}
rm -rf "$D"; mkdir -p "$D"
cat > "$D/up.toml" <<TOML
smtp_listen = "127.0.0.1:12625"
pop_listen = "127.0.0.1:11210"
backend_base_port = 17200
pplistener_admin = "127.0.0.1:18012"
smtp_admin = "127.0.0.1:18027"
pop_admin = "127.0.0.1:18112"
TOML
. bench/lib/bigmailbox.sh
trap 'kill $UP 2>/dev/null || true' EXIT
up
$B/ppadmin --data "$D/var" user add big@bench.test --password pw --quota-bytes 100000000000 >/dev/null
$B/ppadmin --data "$D/var" user add empty@bench.test --password pw >/dev/null
$B/ppadmin --data "$D/var" user add emptyq@bench.test --password pw --quota-bytes 100000000000 >/dev/null
$B/ppadmin --data "$D/var" user add pop50k@bench.test --password pw >/dev/null
down
link_messages big@bench.test 100000
link_messages pop50k@bench.test 50000
sync
up
sleep 2
echo "== $(nproc) CPUs, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
for m in empty big emptyq; do
  $B/ppblast smtp --server 127.0.0.1:12625 --to $m@bench.test --count 200 --connections 20 --size 4096 --quiet >/dev/null
done
for r in $(seq "$ROUNDS"); do
  echo "-- round $r A: empty@ without quota"
  $B/ppblast smtp --server 127.0.0.1:12625 --to empty@bench.test --count "$MSGS" --connections 20 --size 4096 --quiet
  echo "-- round $r B: big@ (100,000 messages) with a quota"
  $B/ppblast smtp --server 127.0.0.1:12625 --to big@bench.test --count "$MSGS" --connections 20 --size 4096 --quiet
  echo "-- round $r C: emptyq@ (empty) with a quota"
  $B/ppblast smtp --server 127.0.0.1:12625 --to emptyq@bench.test --count "$MSGS" --connections 20 --size 4096 --quiet
done
echo "-- POP: USER, PASS, STAT, UIDL, QUIT on pop50k@ (50,000 messages, K=2), one connection"
$B/ppblast pop --server 127.0.0.1:11210 --login pop50k@bench.test:pw --sessions "$SESSIONS" --connections 1 --uidl --quiet
TOKEN=$(sed -n 's/.*Authorization: Bearer \([0-9a-f]*\).*/\1/p' "$D/up.log" | tail -1)
curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:18012/stats \
  | python3 -c 'import json,sys; [print(b["name"], "index_mailboxes", b["gauges"]["index_mailboxes"], "index_entries", b["gauges"]["index_entries"], "index_builds", b["counters"]["index_builds"]) for b in json.load(sys.stdin)["backends"]]' || true
down
trap - EXIT
