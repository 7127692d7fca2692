#!/usr/bin/env bash
# powerpop's RETR relay, zero copy against copied (issue #14): the same
# backends, userbase and mailboxes served by two powerpop processes, one with
# `[serving] splice_min_bytes` at its default (64 KiB: bodies move backend
# socket -> pipe -> client socket with splice(2)) and one with 0 (bodies
# copied through powerpop's buffers, as TLS always is). A B A B rounds of
# ppblast RETR-all sessions; prints MB/s, the ratio and each side's CPU.
# Not a test: run it on a quiet machine. Figures go to kernel-notes/README.md.
#
#   bench/splice-relay.sh                      4 MiB messages
#   SIZE=1572864 bench/splice-relay.sh         1.5 MiB (just over the fetch-ahead window)
#   PREFETCH=1 SIZE=65536 bench/splice-relay.sh    64 KiB streamed, fetch-ahead off
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-/tmp/pm-splice}
SIZE=${SIZE:-4194304}        # bytes per message
MAILBOXES=${MAILBOXES:-20}
PER_BOX=${PER_BOX:-10}       # messages per mailbox
SESSIONS=${SESSIONS:-60}     # RETR-all sessions per round
CONNS=${CONNS:-20}
ROUNDS=${ROUNDS:-2}
PREFETCH=${PREFETCH:-32}     # serving.prefetch_messages_max on both sides
B=target/release

log() { echo "== $*" >&2; }
cargo build --release --quiet --workspace --bins
rm -rf "$W"; mkdir -p "$W/out"

cat > "$W/up.toml" <<TOML
smtp_listen = "127.0.0.1:12625"
lmtp_listen = "127.0.0.1:12624"
pop_listen = "127.0.0.1:12610"
pop3s_listen = "127.0.0.1:12695"
backend_base_port = 17200
pplistener_admin = "127.0.0.1:18210"
smtp_admin = "127.0.0.1:18225"
pop_admin = "127.0.0.1:18211"
replicas = 1
TOML
"$B/powermail" up --data "$W/var" --config "$W/up.toml" > "$W/up.log" 2>&1 &
UP=$!
POPS=()
cleanup() { kill "${POPS[@]}" "$UP" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 300); do grep -q "Ctrl-C" "$W/up.log" && break; sleep 0.1; done
grep -q "Ctrl-C" "$W/up.log" || { cat "$W/up.log" >&2; exit 1; }

: > "$W/logins"; : > "$W/rcpts"
for i in $(seq 1 "$MAILBOXES"); do
    echo "box$i@powermail.test:pw" >> "$W/logins"
    echo "box$i@powermail.test" >> "$W/rcpts"
done
python3 - "$W/var/userbase.db" "$W/rcpts" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
with open(sys.argv[2]) as f:
    db.executemany("INSERT INTO mailboxes (name, password) VALUES (?, '{PLAIN}pw')",
                   [(l.strip(),) for l in f if l.strip()])
db.commit()
PY
log "filling $MAILBOXES mailboxes with $PER_BOX x $SIZE bytes"
"$B/ppblast" smtp --server 127.0.0.1:12625 --to-file "$W/rcpts" \
    --count $((MAILBOXES * PER_BOX)) --connections 4 --size "$SIZE" --quiet > "$W/out/fill.txt"
cat "$W/out/fill.txt" >&2

# The two sides: `powermail up`'s powerpop config plus a [serving] table.
start_pop() { # NAME PORT ADMIN SPLICE_MIN
    sed -e "s/^listen = .*/listen = \"127.0.0.1:$2\"/" \
        -e "s/^tls_listen = .*/tls_listen = \"127.0.0.1:$(($2 + 1000))\"/" \
        -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$3\"/" \
        -e "s#^state_dir = .*#state_dir = \"$W/state-$1\"#" \
        "$W/var/etc/powerpop.toml" > "$W/$1.toml"
    printf '\n[serving]\nprefetch_messages_max = %s\nsplice_min_bytes = %s\n' "$PREFETCH" "$4" >> "$W/$1.toml"
    "$B/powerpop" --config "$W/$1.toml" > "$W/$1.log" 2>&1 &
    POPS+=($!)
}
start_pop splice 12710 18310 65536
start_pop copy 12720 18320 0
sleep 2

run() { # NAME PORT
    /usr/bin/time -f "cpu_s=%U+%S wall_s=%e" -o "$W/out/$1.time" \
        "$B/ppblast" pop --server "127.0.0.1:$2" --login-file "$W/logins" \
        --sessions "$SESSIONS" --connections "$CONNS" --retr --quiet > "$W/out/$1.txt"
    local mbs; mbs=$(grep -o '[0-9.]* MB/s' "$W/out/$1.txt" | head -1 | awk '{print $1}')
    echo "$mbs"
}
pid_cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A total
for r in $(seq 1 "$ROUNDS"); do
    for side in splice copy; do
        port=12710; pid=${POPS[0]}
        [ $side = copy ] && { port=12720; pid=${POPS[1]}; }
        before=$(pid_cpu "$pid")
        mbs=$(run "$side.$r" "$port")
        after=$(pid_cpu "$pid")
        wall=$(grep -o 'wall_s=[0-9.]*' "$W/out/$side.$r.time" | cut -d= -f2)
        cpu=$(awk -v t=$((after - before)) -v w="$wall" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.0f", 100 * t / hz / w}')
        echo "round $r  $side  ${mbs} MB/s  powerpop CPU ${cpu}%  ppblast $(cat "$W/out/$side.$r.time")"
        total[$side]=$(awk -v a="${total[$side]:-0}" -v b="$mbs" 'BEGIN {print a + b}')
    done
done
spliced=$(curl -s -H "Authorization: Bearer $(sed -n 's/^admin_token = "\(.*\)"/\1/p' "$W/splice.toml")" \
    http://127.0.0.1:18310/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["counters"]["bytes_spliced"])')
awk -v s="${total[splice]}" -v c="${total[copy]}" -v n="$ROUNDS" -v size="$SIZE" -v sp="$spliced" 'BEGIN {
    printf "size %d bytes: splice %.0f MB/s, copy %.0f MB/s, ratio %.2fx (mean of %d rounds); bytes spliced %d\n",
           size, s / n, c / n, s / c, n, sp }'
