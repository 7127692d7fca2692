#!/usr/bin/env python3
"""sendfile(2) against splice(2) (file -> pipe -> socket) and read+write, from the page
cache to a loopback TCP socket: the three ways a backend can send a stored message.
Figures go to kernel-notes/README.md. Not a test.

    bench/sendfile-vs-splice.py [SIZE_BYTES ...]     (default: 4096 65536 1048576)

Each size: one file of that size in /tmp (read once so it is cached), sent 2 GiB worth per
method over one connection to a reader process that discards the bytes. Python adds a fixed
cost per call; the loop makes one call per 1 MiB (sendfile, splice) so the kernel work
dominates for the larger sizes.
"""
import os
import socket
import sys
import time

CHUNK = 1 << 20
TOTAL_BYTES = 2 << 30  # per method and size, so small sizes run many times


def reader(conn):
    while conn.recv(1 << 20):
        pass


class Child:
    """The reading end, in its own process (no shared interpreter lock)."""

    def __init__(self, pid):
        self.pid = pid

    def join(self):
        os.waitpid(self.pid, 0)


def connection():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    srv.close()
    pid = os.fork()
    if pid == 0:
        cli.close()
        reader(peer)
        os._exit(0)
    return cli, peer, Child(pid)


def via_sendfile(sock, fd, size):
    off = 0
    while off < size:
        off += os.sendfile(sock.fileno(), fd, off, min(CHUNK, size - off))


def via_splice(sock, fd, size, pipe=[None]):
    if pipe[0] is None:
        pipe[0] = os.pipe()
    r, w = pipe[0]
    off = 0
    while off < size:
        n = os.splice(fd, w, min(CHUNK, size - off), offset_src=off)
        off += n
        while n:
            n -= os.splice(r, sock.fileno(), n)


def via_read_write(sock, fd, size):
    off = 0
    while off < size:
        data = os.pread(fd, min(CHUNK, size - off), off)
        sock.sendall(data)
        off += len(data)


def main():
    sizes = [int(s) for s in sys.argv[1:]] or [4096, 65536, 1 << 20]
    print(f"{os.cpu_count()} CPUs, {os.uname().release}; {TOTAL_BYTES >> 20} MiB per run")
    for size in sizes:
        path = f"/tmp/pm-sendfile-{size}"
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        fd = os.open(path, os.O_RDONLY)
        os.pread(fd, size, 0)  # into the page cache
        repeat = max(1, TOTAL_BYTES // size)
        for name, fn in [("sendfile", via_sendfile), ("splice", via_splice), ("read+write", via_read_write)]:
            cli, peer, t = connection()
            c0 = os.times()  # children's times count once they are reaped
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn(cli, fd, size)
            cli.shutdown(socket.SHUT_WR)
            t.join()
            secs = time.perf_counter() - t0
            c1 = os.times()
            cpu = sum(c1[:4]) - sum(c0[:4])
            cli.close()
            peer.close()
            mb = repeat * size / secs / 1e6
            print(f"size {size:>8} B  {name:<10} {mb:8.0f} MB/s  {repeat / secs:9.0f} msgs/s  cpu {cpu / secs * 100:4.0f}% (both ends)")
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
