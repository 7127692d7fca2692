"""Small SMTP clients for powersmtp's end-to-end tests (driven from e2e.rs).

Usage:
  smtp_client.py send HOST PORT JSON   JSON: {"from": ..., "rcpts": [...], "msg": ...}
      one transaction with smtplib; prints {"ehlo": code, "mail": [code, text],
      "rcpts": [[code, text]...], "data": [code, text] or null}
  smtp_client.py raw HOST PORT         sends stdin as is in one write after the
      greeting, half-closes, prints every byte received until EOF
  smtp_client.py hold HOST PORT N      opens N connections one after the other
      and prints the greeting line of each, then closes them all
"""
import json
import smtplib
import socket
import sys


def send(host, port, spec):
    s = smtplib.SMTP(host, int(port), timeout=30)
    out = {"ehlo": s.ehlo()[0]}
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


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "send":
        send(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    elif cmd == "raw":
        raw(sys.argv[2], sys.argv[3])
    elif cmd == "hold":
        hold(sys.argv[2], sys.argv[3], sys.argv[4])
