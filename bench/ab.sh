#!/usr/bin/env bash
# A B comparison of two builds of PowerMail on one workload, with the CPU each daemon used.
# Not a test; figures go to bench/RESULTS.md by hand.
#
#   bench/ab.sh WORKLOAD DIR_A DIR_B [TIMES]
#
# WORKLOAD: smtp   smtp-source, 20 sessions, 4 KiB, a new connection per message (M=10000)
#           r10    the same with 10 recipients per message (M messages; deliveries/s)
#           drain  POP3 RETR + DELE of 50 mailboxes x 100 x 4 KiB (filled by ppblast)
#           retr   POP3 RETR of 20 mailboxes x 50 x 64 KiB, 100 sessions (SESS)
# DIR_A, DIR_B: directories holding powermail, pplistener, powersmtp, powerpop, ppblast
# (copies of target/release of two commits). Each run is a fresh `powermail up` (K=1, two
# backends) on ports 12525/11110, ROUNDS rounds (default 3) on it; the two builds
# alternate TIMES times (default 3). Extra environment: M, SESS, ROUNDS, K, L (message
# size for smtp and r10, default 4096), BACKENDS (default 2), BACKENDS_A and BACKENDS_B
# (one side's backends: DIR_A and DIR_B may then be the same build).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,15p' "$0"; exit 2; }
workload=$1 a=$2 b=$3 times=${4:-3}
W=${W:-/tmp/pm-ab}
mkdir -p "$W"

one_run() { # BIN BACKENDS
    local B=$1 backends=$2 d
    d=$(mktemp -d "$W/run.XXXX")
    cat > "$d/up.toml" <<TOML
smtp_listen = "127.0.0.1:12525"
pop_listen = "127.0.0.1:11110"
backend_base_port = 17100
pplistener_admin = "127.0.0.1:18010"
smtp_admin = "127.0.0.1:18025"
pop_admin = "127.0.0.1:18110"
TOML
    "$B/powermail" up --data "$d/var" --config "$d/up.toml" --backends "$backends" --replicas "${K:-1}" > "$d/up.log" 2>&1 &
    local up=$!
    for _ in $(seq 300); do grep -q "Ctrl-C" "$d/up.log" && break; sleep 0.1; done
    python3 - "$d/var/userbase.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
names = ["s@bench.test"] + [f"{i}s@bench.test" for i in range(11)] + [f"d{i}@bench.test" for i in range(50)]
db.executemany("INSERT INTO mailboxes (name, password) VALUES (?, ?)", [(n, "{PLAIN}pw") for n in names])
db.commit()
PY
    sleep 2
    local n=50 size=4096 count=5000
    [ "$workload" = retr ] && { n=20; size=65536; count=1000; }
    for i in $(seq 0 $((n - 1))); do echo "d$i@bench.test"; done > "$d/rcpts"
    for i in $(seq 0 $((n - 1))); do echo "d$i@bench.test:pw"; done > "$d/logins"
    cpu() { # pplistener, powersmtp, powerpop CPU ticks
        local p out=""
        for name in pplistener powersmtp powerpop; do
            local t=0
            for p in $(pgrep -x $name); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done
            out="$out $t"
        done
        echo $out
    }
    local r c0 c1 fig
    [ "$workload" = retr ] && "$B/ppblast" smtp --server 127.0.0.1:12525 --to-file "$d/rcpts" \
        --count $count --connections 20 --size $size --quiet > /dev/null
    for r in $(seq "${ROUNDS:-3}"); do
        [ "$workload" = drain ] && "$B/ppblast" smtp --server 127.0.0.1:12525 --to-file "$d/rcpts" \
            --count $count --connections 20 --size $size --quiet > /dev/null
        sync; sleep 3
        c0=$(cpu)
        case $workload in
            smtp)
                local t0 t1 m=${M:-10000}
                t0=$(date +%s.%N)
                smtp-source -f b@sender.test -s 20 -l "${L:-4096}" -m "$m" -t s@bench.test 127.0.0.1:12525 > /dev/null
                t1=$(date +%s.%N)
                fig=$(awk -v m="$m" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f msgs/s", m/(b-a)}') ;;
            r10)
                local t0 t1 m=${M:-2000}
                t0=$(date +%s.%N)
                smtp-source -f b@sender.test -s 20 -l "${L:-4096}" -m "$m" -r 10 -t s@bench.test 127.0.0.1:12525 > /dev/null
                t1=$(date +%s.%N)
                fig=$(awk -v m="$m" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f deliveries/s", 10*m/(b-a)}') ;;
            drain)
                fig=$("$B/ppblast" pop --server 127.0.0.1:11110 --login-file "$d/logins" --sessions 50 \
                    --connections 20 --retr --dele --quiet 2>&1 | grep -o '= [0-9.]* ops/s' | tr -d '=') ;;
            retr)
                fig=$("$B/ppblast" pop --server 127.0.0.1:11110 --login-file "$d/logins" --sessions "${SESS:-100}" \
                    --connections 20 --retr --quiet 2>&1 | grep -o '[0-9.]* MB/s') ;;
            *) echo "unknown workload $workload" >&2; kill $up; exit 2 ;;
        esac
        c1=$(cpu)
        echo "$(basename "$B") ($backends backends) round $r: $fig; CPU s pplistener/powersmtp/powerpop" \
            "$(paste -d' ' <(echo $c0) <(echo $c1) | awk '{printf "%.2f/%.2f/%.2f", ($4-$1)/100, ($5-$2)/100, ($6-$3)/100}')"
    done
    kill $up; wait $up 2>/dev/null || true
    sleep 4 # the ports and the io_uring sockets of the killed backends
}

for _ in $(seq "$times"); do
    one_run "$a" "${BACKENDS_A:-${BACKENDS:-2}}"
    one_run "$b" "${BACKENDS_B:-${BACKENDS:-2}}"
done
