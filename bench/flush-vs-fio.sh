#!/usr/bin/env bash
# Issue #13 part 1: pplistener PUT 4 KiB in durability = "file" vs "syncfs", next to fio's
# new-file+fsync rate, all on ONE loop-mounted file system that holds only the backend's
# data_dir (the deployment syncfs is meant for), A/B interleaved in one run.
# bench/store-vs-fio.sh adapted; not a test: figures go to bench/RESULTS.md by hand.
#
#   bench/flush-vs-fio.sh [FS] [ROUNDS] [IMAGE_DIR]
#     FS        ext4 (journaled, default) | ext4-nojournal | xfs
#     ROUNDS    A/B rounds (default 2); each round runs fio, file, syncfs in that order
#     IMAGE_DIR where the 2 GiB sparse image goes (default /var/tmp; root's file system)
#
# Needs root (losetup, mount). PUT: 4 KiB messages, 32 in flight, 200 mailboxes, one
# backend pinned to CPU 0. fio: 8 jobs each creating new 4 KiB files with an O_DIRECT
# write + fsync per file (the same pattern as bench/store-vs-fio.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
FS="${1:-ext4}"
ROUNDS="${2:-2}"
IMG_DIR="${3:-/var/tmp}"
COUNT="${PM_BENCH_COUNT:-20000}"
W=$(mktemp -d /tmp/pm-flush.XXXXXX)
IMG="$IMG_DIR/pm-flush-$$.img"
MNT="$W/mnt"
command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
[ "$FS" = xfs ] && ! command -v mkfs.xfs >/dev/null && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs >/dev/null; }
# PM_BENCH_PROFILE=debug uses target/debug (the workspace's dev profile is optimised:
# opt-level 1, dependencies 2) when a release build is too slow to make on a shared machine.
PROFILE="${PM_BENCH_PROFILE:-release}"
if [ "$PROFILE" = release ]; then
    cargo build --release -q --workspace --bins
else
    cargo build -q --workspace --bins
fi
BIN="target/$PROFILE"

PID=""
LOOP=""
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    mountpoint -q "$MNT" && umount "$MNT" || true
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true
    rm -f "$IMG"
    rm -rf "$W"
}
trap cleanup EXIT

truncate -s 2G "$IMG"
LOOP=$(losetup --find --show --direct-io=on "$IMG")
case "$FS" in
    ext4) mkfs.ext4 -q -F "$LOOP" ;;
    ext4-nojournal) mkfs.ext4 -q -F -O ^has_journal "$LOOP" ;;
    xfs) mkfs.xfs -q -f "$LOOP" ;;
    *) echo "unknown FS $FS"; exit 2 ;;
esac
mkdir -p "$MNT"
mount -o noatime "$LOOP" "$MNT"

SECRET=bench-secret-0123456789
PORT=17100

# One PUT run in MODE on a fresh data_dir; prints ppstorebench's line and the flush counters.
put_run() {
    local mode=$1 data="$MNT/data-$1"
    rm -rf "$data"
    cat > "$W/ppl.toml" <<TOML
secret = "$SECRET"
admin_listen = "127.0.0.1:$((PORT + 1))"
admin_token = "tok"
[limits]
free_bytes_min = 0
[[backend]]
data_dir = "$data"
listen = "127.0.0.1:$PORT"
cpu = 0
durability = "$mode"
TOML
    : > "$W/ppl.log"
    "$BIN/pplistener" --config "$W/ppl.toml" > "$W/ppl.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do grep -q "admin port" "$W/ppl.log" && break; sleep 0.1; done
    echo -n "pplistener durability=$mode: "
    "$BIN/ppstorebench" put --backend 127.0.0.1:$PORT --secret $SECRET \
        --size-bytes 4096 --inflight 32 --count "$COUNT" --mailboxes 200 | tail -1
    curl -s -H 'Authorization: Bearer tok' "http://127.0.0.1:$((PORT + 1))/stats" |
        python3 -c 'import json,sys; b=json.load(sys.stdin)["backends"][0]; c=b["counters"]; print("   flushes=%d (fdatasync %d, dir fsync %d, syncfs %d) batches=%d puts/batch=%.1f max=%d" % (c["flushes"], c["flushes_fdatasync"], c["flushes_dir_fsync"], c["flushes_syncfs"], c["batches"], c["batch_puts"] / max(c["batches"], 1), b["gauges"]["batch_puts_max"]))'
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    rm -rf "$data"
}

fio_run() {
    rm -rf "$MNT/fio"; mkdir -p "$MNT/fio"
    fio --name=newfile --directory="$MNT/fio" --numjobs=8 --nrfiles=1000 --filesize=4k --bs=4k \
        --rw=write --direct=1 --fsync=1 --create_on_open=1 --ioengine=psync --group_reporting \
        --output-format=terse --terse-version=3 |
        awk -F';' '{printf "fio newfile+fsync: %s files/s (write iops)\n", $49}'
    rm -rf "$MNT/fio"
}

echo "== build: $PROFILE at $(git rev-parse --short HEAD)"
echo "== machine: $(nproc) CPUs, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== data fs: $FS on $LOOP (image $IMG, $(findmnt -no FSTYPE,OPTIONS "$MNT"))"
for r in $(seq "$ROUNDS"); do
    echo "== round $r"
    fio_run
    put_run file
    put_run syncfs
done
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
