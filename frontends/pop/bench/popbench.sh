#!/usr/bin/env bash
# powerpop benchmark: 2 pplistener backends, K=2 copies, SQLite userbase.
set -euo pipefail
# Needs: cargo build --release -p pplistener -p powerpop -p powermail-bench
T=${T:-target/release}
D=$(mktemp -d /tmp/popbench.XXXX)
SECRET=bench-secret-0123456789
cat > $D/ppl.toml <<EOT
secret = "$SECRET"
admin_listen = "127.0.0.1:28010"
admin_token = "tok"
[limits]
free_bytes_min = 0
[[backend]]
data_dir = "$D/disk0"
listen = "127.0.0.1:27900"
[[backend]]
data_dir = "$D/disk1"
listen = "127.0.0.1:27901"
EOT
cat > $D/pop.toml <<EOT
listen = "127.0.0.1:21110"
admin_listen = "127.0.0.1:21111"
admin_token = "tok"
userbase = "sqlite://$D/userbase.db"
state_dir = "$D/state"
secret = "$SECRET"
[[backend]]
name = "b0"
addr = "127.0.0.1:27900"
[[backend]]
name = "b1"
addr = "127.0.0.1:27901"
EOT
$T/pplistener --config $D/ppl.toml > $D/ppl.log 2>&1 &
PPL=$!
sleep 1
$T/powerpop --config $D/pop.toml > $D/pop.log 2>&1 &
POP=$!
trap 'kill $POP $PPL 2>/dev/null || true' EXIT
sleep 1
python3 "$(dirname "$0")/populate.py" $SECRET $D/userbase.db 100 10 4096 127.0.0.1:27900 127.0.0.1:27901
python3 - <<EOT
import sqlite3
c = sqlite3.connect("$D/userbase.db")
for i in range(100):
    c.execute("INSERT OR IGNORE INTO mailboxes (name, password) VALUES (?, '{PLAIN}pw')", ('e%d@bench.test' % i,))
c.commit()
EOT
for i in $(seq 0 99); do echo "u$i@bench.test:pw"; done > $D/full.logins
for i in $(seq 0 99); do echo "e$i@bench.test:pw"; done > $D/empty.logins
echo "### empty mailboxes: login + STAT + QUIT"
$T/ppblast pop --server 127.0.0.1:21110 --login-file $D/empty.logins --sessions 4000 --connections 20 --quiet
echo "### 10 messages (K=2 copies on 2 backends): login + STAT + QUIT"
$T/ppblast pop --server 127.0.0.1:21110 --login-file $D/full.logins --sessions 4000 --connections 20 --quiet
echo "### 10 messages of 4 KiB: login + UIDL + RETR all + QUIT"
$T/ppblast pop --server 127.0.0.1:21110 --login-file $D/full.logins --sessions 2000 --connections 20 --retr --quiet
curl -s -H 'Authorization: Bearer tok' http://127.0.0.1:21111/stats | python3 -c 'import json,sys; v=json.load(sys.stdin); print("counters", v["counters"]); print("latency", json.dumps(v["latency"]))'
