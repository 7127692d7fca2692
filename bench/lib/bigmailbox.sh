# Sourced by bench/bigmailbox.sh and bench/million.sh: start and stop `powermail up`
# (2 backends, K=2) and fill big mailboxes directly in the backends' stores.
# Needs B (the binaries' directory) and D (the work directory, holding up.toml).

UP=
# Starts `powermail up` on "$D/var" and waits for it.
up() {
  : > "$D/up.log"
  "$B/powermail" up --data "$D/var" --config "$D/up.toml" --backends 2 --replicas 2 >> "$D/up.log" 2>&1 &
  UP=$!
  for _ in $(seq 300); do grep -q "Ctrl-C" "$D/up.log" && return; sleep 0.1; done
  echo "powermail up did not start:"; cat "$D/up.log"; exit 1
}
down() { kill "$UP"; wait "$UP" 2>/dev/null || true; }

# link_messages MAILBOX COUNT: COUNT messages of 4 KiB in MAILBOX on every backend, as hard
# links made directly in each stopped backend's store (ext4: at most 65,000 links per
# inode, so one body per 50,000 links). Ids are the same on every backend (K copies).
link_messages() {
  python3 - "$D/var/disks" "$1" "$2" <<'PY'
import hashlib, os, sys
disks, mailbox, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = (b"Subject: stored\r\n\r\n" + b"x" * 4076 + b"\r\n")[:4096]
h = hashlib.sha256(mailbox.encode()).hexdigest()
for disk in sorted(os.listdir(disks)):
    root = os.path.join(disks, disk)
    d = os.path.join(root, "mbox", h[0:2], h[2:4], mailbox)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        if i % 50_000 == 0:
            src = os.path.join(root, f"src-{mailbox}-{i}")
            with open(src, "wb") as f:
                f.write(body)
        os.link(src, os.path.join(d, f"{1700000000000000 + i:016x}.bench.{i:x}"))
    for f in os.listdir(root):
        if f.startswith("src-"):
            os.remove(os.path.join(root, f))
PY
}
