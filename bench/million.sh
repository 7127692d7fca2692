#!/usr/bin/env bash
# A 1,000,000-message mailbox over POP3 (issue #14, "1,000,000 messages work"): the
# PowerMail side only. Not a test (it takes minutes and ~1 GB of directory blocks); what
# it finds goes to bench/RESULTS.md by hand.
#
#   bench/million.sh        env: MESSAGES=1000000, PROFILE=release
#
# `powermail up` with 2 backends and K=2; pop1m@ holds MESSAGES messages of 4 KiB on both
# backends, as hard links made directly in each backend's store while it is stopped (ext4:
# at most 65,000 links per inode, so one body per 50,000 links). Then, over POP3:
#   1. the first login (each backend walks the mailbox into its index; a login that no
#      backend answers within listing_timeout_ms gets -ERR [SYS/TEMP] and is retried), STAT, UIDL;
#   2. three more logins with UIDL;
#   3. RETR of the first and the last message listed, DELE of the first, QUIT;
#   4. one more login: the deleted id gone from UIDL.
# once with powerpop's default limits (a session lists at most 100,000 messages, the oldest)
# and once with them raised (SIGHUP) so that a session sees the whole mailbox.
# and the resident memory of powerpop and of pplistener at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
MESSAGES=${MESSAGES:-1000000}
if [ "$PROFILE" = release ]; then
  cargo build --release -q --workspace --bins
else
  cargo build -q --workspace --bins
fi
B=$PWD/target/$PROFILE
D=/tmp/pm-million
rm -rf "$D"; mkdir -p "$D"
cat > "$D/up.toml" <<TOML
smtp_listen = "127.0.0.1:12725"
pop_listen = "127.0.0.1:11310"
backend_base_port = 17300
pplistener_admin = "127.0.0.1:18013"
smtp_admin = "127.0.0.1:18028"
pop_admin = "127.0.0.1:18113"
TOML
. bench/lib/bigmailbox.sh
trap 'kill $UP 2>/dev/null || true; rm -rf "$D/var/disks"' EXIT
up
$B/ppadmin --data "$D/var" user add pop1m@bench.test --password pw >/dev/null
down
echo "== linking $MESSAGES messages into pop1m@ on each backend"
link_messages pop1m@bench.test "$MESSAGES"
sync
up
echo "== $(nproc) CPUs, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
cat > "$D/pop.py" <<'PY'
import socket, sys, time
n, want, capped = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "capped"

def session(steps=None):
    s = socket.create_connection(("127.0.0.1", 11310), timeout=600)
    f = s.makefile("rb")
    assert f.readline().startswith(b"+OK")
    def cmd(line):
        s.sendall(line.encode() + b"\r\n")
        return f.readline()
    def block():
        data = bytearray()
        while not (data.endswith(b"\r\n.\r\n") or data == b".\r\n"):
            chunk = f.read1(1 << 20)
            assert chunk, "connection closed in a block"
            data += chunk
        return data
    t0 = time.perf_counter()
    cmd("USER pop1m@bench.test")
    r = cmd("PASS pw")
    t1 = time.perf_counter()
    if not r.startswith(b"+OK"):
        cmd("QUIT")
        return r.strip().decode(), None, (t1 - t0) * 1000, None, None
    count = int(cmd("STAT").split()[1])
    assert cmd("UIDL").startswith(b"+OK")
    uidl = block()
    t2 = time.perf_counter()
    out = steps(cmd, block) if steps else None
    cmd("QUIT")
    return count, uidl, (t1 - t0) * 1000, (t2 - t0) * 1000, out

tries = 0
while True:
    tries += 1
    count, uidl, login, total, _ = session()
    if uidl is not None:
        break
    print(f"login {tries}: {count} after {login:.0f} ms")
    assert tries < 60
    time.sleep(1)
print(f"login {tries}: {count} messages, login {login:.0f} ms, login + STAT + UIDL {total:.0f} ms")
assert count == want, (count, want)
first_uid = uidl.split(b"\r\n")[0].split()[1]
for i in range(3):
    count, _, login, total, _ = session()
    print(f"again: login {login:.1f} ms, login + STAT + UIDL {total:.0f} ms")
def retr_dele(cmd, block):
    t = time.perf_counter()
    assert cmd("RETR 1").startswith(b"+OK"); first = block()
    assert cmd(f"RETR {want}").startswith(b"+OK"); last = block()
    assert cmd("DELE 1").startswith(b"+OK")
    return len(first), len(last), (time.perf_counter() - t) * 1000
_, _, _, _, (a, b, ms) = session(retr_dele)
print(f"RETR 1 ({a} bytes) + RETR {want} ({b} bytes) + DELE 1: {ms:.1f} ms")
count, uidl, login, total, _ = session()
print(f"after the DELE: {count} messages, login {login:.0f} ms, login + STAT + UIDL {total:.0f} ms")
assert count == (want if capped else want - 1), count
assert first_uid not in uidl, "the deleted message is still listed"
print("ok: every step answered, the deletion is seen by the next session")
PY
echo "-- powerpop defaults (listing_max_messages = 100,000 per session, listing_timeout_ms = 2,000)"
python3 "$D/pop.py" "$MESSAGES" "$(( MESSAGES < 100000 ? MESSAGES : 100000 ))" "$([ "$MESSAGES" -gt 100000 ] && echo capped || echo whole)"
echo "-- [limits] listing_max_messages = 2,000,000, listing_timeout_ms = 20,000 (SIGHUP)"
printf '\n[limits]\nlisting_max_messages = 2000000\nlisting_timeout_ms = 20000\n' >> "$D/var/etc/powerpop.toml"
pkill -HUP -f "powerpop --config $D/var/etc/powerpop.toml"
sleep 1
python3 "$D/pop.py" "$MESSAGES" "$(( MESSAGES - 1 ))" whole
for d in powerpop pplistener; do
  echo "$d RSS: $(ps -o rss= -C "$d" | awk '{s+=$1} END {printf "%.0f MiB", s/1024}')"
done
down
trap - EXIT
rm -rf "$D/var/disks"
