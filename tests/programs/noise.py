"""File, pipe, UDP and unix-socket I/O, then one TCP request as a positive control.

wirespan must report only the TCP connection.
"""
import os
import socket
import sys
import tempfile

port = int(sys.argv[1])
for _ in range(20):
    with tempfile.TemporaryFile() as f:
        f.write(b"GET /file HTTP/1.1\r\n\r\n" * 10)
        f.seek(0)
        f.read()
    r, w = os.pipe()
    os.write(w, b"GET /pipe HTTP/1.1\r\n\r\n")
    os.read(r, 100)
    os.close(r)
    os.close(w)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.sendto(b"GET /udp HTTP/1.1\r\n\r\n", u.getsockname())
    u.recvfrom(100)
    u.close()
    a, b = socket.socketpair()
    a.sendall(b"GET /unix HTTP/1.1\r\n\r\n")
    b.recv(100)
    a.close()
    b.close()
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
while s.recv(65536):
    pass
s.close()
print(os.getpid(), flush=True)
