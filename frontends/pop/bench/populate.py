# Populates the bench mailboxes straight through the backend protocol (PPL/1 PUT
# with every mailbox per message: one file, hard links per backend).
import socket, hmac, hashlib, sys, sqlite3
secret, db, n_users, n_msgs, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
backends = sys.argv[6:]
users = ['u%d@bench.test' % i for i in range(n_users)]
c = sqlite3.connect(db)
for u in users:
    c.execute("INSERT OR IGNORE INTO mailboxes (name, password) VALUES (?, '{PLAIN}pw')", (u,))
c.commit()
body = b'Subject: bench\r\n\r\n' + (b'x' * 70 + b'\r\n') * ((size - 18) // 72)
for addr in backends:
    h, p = addr.rsplit(':', 1)
    s = socket.create_connection((h, int(p)))
    f = s.makefile('rb')
    g = f.readline().split()
    nonce = g[3].decode()
    proof = hmac.new(secret.encode(), b'PPL/1 ' + nonce.encode(), hashlib.sha256).hexdigest()
    s.sendall(b'AUTH ' + proof.encode() + b'\r\n'); assert f.readline().startswith(b'+OK')
    for i in range(n_msgs):
        msgid = '%016x.bench.%x' % (1700000000000000 + i, i)
        req = ('PUT %s %d\r\n' % (msgid, len(users))).encode() + ''.join(u + '\r\n' for u in users).encode()
        req += b'%d\r\n' % len(body) + body + b'0\r\n'
        s.sendall(req)
        r = f.readline(); assert r.startswith(b'+OK'), r
print('populated', len(users), 'users x', n_msgs, 'msgs of', len(body), 'bytes on', len(backends), 'backends')
