#!/usr/bin/env bash
# pplistener PUT/s and GET MB/s next to fio's figure for the same pattern, in one run
# (issue #2's benchmark). Not a test: figures go to bench/RESULTS.md by hand.
#
#   bench/store-vs-fio.sh [WORKDIR]     (default /tmp/pm-bench; same file system as the data)
#
# PUT: 4 KiB messages, 32 in flight, one backend (one executor, one CPU).
#   fio peer: 8 jobs each creating new 4 KiB files, O_DIRECT write + fsync per file.
# GET: 1 MiB messages, 8 in flight, sent with sendfile from the page cache.
#   fio peer: sequential O_DIRECT 1 MiB reads (the disk's own rate).
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-/tmp/pm-bench}"
rm -rf "$W"; mkdir -p "$W/fio"
command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
cargo build --release -q --workspace --bins
SECRET=bench-secret-0123456789
PORT=17000
cat > "$W/ppl.toml" <<TOML
secret = "$SECRET"
[limits]
free_bytes_min = 0
[[backend]]
data_dir = "$W/disk0"
listen = "127.0.0.1:$PORT"
cpu = 0
TOML
target/release/pplistener --config "$W/ppl.toml" > "$W/ppl.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$W/ppl.log" && break; sleep 0.1; done

echo "== machine: $(nproc) CPUs, $(uname -r), $(df -h "$W" | tail -1 | awk '{print $1, $2}')"
echo "== pplistener PUT 4 KiB x32"
target/release/ppstorebench put --backend 127.0.0.1:$PORT --secret $SECRET --size-bytes 4096 --inflight 32 --count 20000
echo "== fio: new 4 KiB file + fsync, 8 jobs"
fio --name=newfile --directory="$W/fio" --numjobs=8 --nrfiles=1000 --filesize=4k --bs=4k \
    --rw=write --direct=1 --fsync=1 --create_on_open=1 --ioengine=psync --group_reporting \
    --output-format=terse --terse-version=3 | awk -F';' '{printf "fio newfile+fsync: %s files/s (write iops), %.1f MB/s\n", $49, $48/1000}'
rm -rf "$W/fio"; mkdir -p "$W/fio"
echo "== pplistener GET 1 MiB x8"
target/release/ppstorebench get --backend 127.0.0.1:$PORT --secret $SECRET --size-bytes 1048576 --inflight 8 --count 4000 --mailboxes 200
echo "== fio: sequential O_DIRECT 1 MiB reads"
fio --name=seqread --directory="$W/fio" --size=1g --bs=1m --rw=read --direct=1 --ioengine=io_uring \
    --iodepth=8 --output-format=terse --terse-version=3 | awk -F';' '{printf "fio seq O_DIRECT read: %.0f MB/s (%s IOPS)\n", $7/1000*1.024, $8}'
