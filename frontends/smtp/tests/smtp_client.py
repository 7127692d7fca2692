"""Small SMTP clients for powersmtp's end-to-end tests (driven from e2e.rs).

Usage:
  smtp_client.py send HOST PORT JSON   JSON: {"from": ..., "rcpts": [...], "msg": ...}
      one transaction with smtplib; prints {"ehlo": code, "mail": [code, text],
      "rcpts": [[code, text]...], "data": [code, text] or null}
  smtp_client.py raw HOST PORT         sends stdin as is in one write after the
      greeting, half-closes, prints every byte received until EOF
  smtp_client.py hold HOST PORT N      opens N connections one after the other
      and prints the greeting line of each, then closes them all
  smtp_client.py sink OUTDIR           a forwarding relay stand-in on a free port
      (prints "sink listening on PORT"): RCPT of an address starting with
      "refuse" gets 550, DATA for "rejectdata..." gets 554 after the final
      dot; accepted messages are written to OUTDIR/N.eml, first line the
      recipients, then the received bytes (still dot-stuffed)
"""
import json
import smtplib
import socket
import sys


def send(host, port, spec):
    s = smtplib.SMTP(host, int(port), timeout=30)
    out = {"ehlo": s.ehlo()[0]}
    if spec.get("tls"):
        import ssl
        out["starttls"] = s.starttls(context=ssl._create_unverified_context())[0]
        out["ehlo"] = s.ehlo()[0]
        out["cipher"] = s.sock.cipher()[0]
    code, text = s.mail(spec["from"], spec.get("mail_options", []))
    out["mail"] = [code, text.decode()]
    out["rcpts"] = []
    out["data"] = None
    if code == 250:
        for r in spec["rcpts"]:
            code, text = s.rcpt(r)
            out["rcpts"].append([code, text.decode()])
        if any(c == 250 for c, _ in out["rcpts"]):
            try:
                code, text = s.data(spec["msg"].encode())
                out["data"] = [code, text.decode()]
            except smtplib.SMTPDataError as e:
                out["data"] = [e.smtp_code, e.smtp_error.decode()]
    try:
        s.quit()
    except smtplib.SMTPException:
        pass
    print(json.dumps(out))


def raw(host, port):
    payload = sys.stdin.buffer.read()
    c = socket.create_connection((host, int(port)), timeout=30)
    got = c.recv(4096)
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    while True:
        b = c.recv(65536)
        if not b:
            break
        got += b
    sys.stdout.write(got.decode("utf-8", "replace"))


def hold(host, port, n):
    socks = []
    for _ in range(int(n)):
        c = socket.create_connection((host, int(port)), timeout=30)
        f = c.makefile("rb")
        print(f.readline().decode().strip(), flush=True)
        socks.append((c, f))
    for c, _ in socks:
        c.close()


def sink(outdir):
    import os
    import threading
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    print("sink listening on %d" % srv.getsockname()[1], flush=True)
    counter = [0]
    lock = threading.Lock()

    def serve(c):
        f = c.makefile("rb")
        c.sendall(b"220 sink ESMTP\r\n")
        rcpts = []
        while True:
            line = f.readline()
            if not line:
                return
            cmd = line.decode("utf-8", "replace").strip()
            up = cmd.upper()
            if up.startswith("EHLO") or up.startswith("HELO"):
                c.sendall(b"250-sink\r\n250 PIPELINING\r\n")
            elif up.startswith("MAIL"):
                rcpts = []
                c.sendall(b"250 ok\r\n")
            elif up.startswith("RCPT"):
                addr = cmd[cmd.index("<") + 1:cmd.rindex(">")]
                if addr.startswith("refuse"):
                    c.sendall(b"550 5.1.1 no such user\r\n")
                else:
                    rcpts.append(addr)
                    c.sendall(b"250 ok\r\n")
            elif up == "DATA":
                c.sendall(b"354 go\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n") and data != b".\r\n":
                    chunk = f.readline()
                    if not chunk:
                        return
                    data += chunk
                if any(r.startswith("rejectdata") for r in rcpts):
                    c.sendall(b"554 5.7.1 content rejected\r\n")
                    continue
                with lock:
                    counter[0] += 1
                    n = counter[0]
                path = os.path.join(outdir, "%d.eml" % n)
                with open(path + ".tmp", "wb") as out:
                    out.write((",".join(rcpts) + "\n").encode())
                    out.write(data[:-3])
                os.rename(path + ".tmp", path)
                c.sendall(b"250 2.0.0 sunk\r\n")
            elif up == "QUIT":
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "send":
        send(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    elif cmd == "raw":
        raw(sys.argv[2], sys.argv[3])
    elif cmd == "hold":
        hold(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "sink":
        sink(sys.argv[2])
