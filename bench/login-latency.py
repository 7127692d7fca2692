#!/usr/bin/env python3
"""POP3 login latency on one mailbox, one session at a time (issue #14's big-mailbox
target): for each session, the time from USER to the +OK of PASS, and to the end of UIDL.
Prints the medians (the first session, which may build the index, is left out).

    bench/login-latency.py [HOST:PORT] [USER] [PASSWORD] [SESSIONS]
    defaults: 127.0.0.1:11210 pop50k@bench.test pw 30   (the mailbox of bench/bigmailbox.sh)
"""
import socket
import statistics
import sys
import time

addr = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:11210"
user = sys.argv[2] if len(sys.argv) > 2 else "pop50k@bench.test"
password = sys.argv[3] if len(sys.argv) > 3 else "pw"
sessions = int(sys.argv[4]) if len(sys.argv) > 4 else 30
host, port = addr.rsplit(":", 1)

times = []
for _ in range(sessions):
    s = socket.create_connection((host, int(port)), timeout=30)
    f = s.makefile("rb")
    assert f.readline().startswith(b"+OK")
    t0 = time.perf_counter()
    s.sendall(f"USER {user}\r\n".encode())
    f.readline()
    s.sendall(f"PASS {password}\r\n".encode())
    reply = f.readline()
    assert reply.startswith(b"+OK"), reply
    t1 = time.perf_counter()
    s.sendall(b"UIDL\r\n")
    assert f.readline().startswith(b"+OK")
    # Read the block in bulk, as a mail client written in C does: a Python
    # readline() per line costs more than the server's whole answer.
    block = bytearray()
    while not block.endswith(b"\r\n.\r\n") and block != b".\r\n":
        chunk = f.read1(1 << 20)
        assert chunk, "connection closed in UIDL"
        block += chunk
    lines = block.count(b"\r\n") - 1
    t2 = time.perf_counter()
    s.sendall(b"QUIT\r\n")
    f.readline()
    s.close()
    times.append(((t1 - t0) * 1000, (t2 - t0) * 1000))
times = times[1:] or times
print(
    "%s: %d messages, login p50 %.1f ms, login + UIDL p50 %.1f ms (%d sessions, load %s)"
    % (user, lines, statistics.median(a for a, _ in times),
       statistics.median(b for _, b in times), len(times),
       " ".join(open("/proc/loadavg").read().split()[:3]))
)
