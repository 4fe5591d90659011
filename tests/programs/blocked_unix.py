"""Blocks in send on a full unix socket until a line arrives on stdin (then a helper thread
drains the other end)."""
import socket
import sys
import threading

a, b = socket.socketpair()
a.setblocking(False)
# Fill a's send buffer (and b's receive buffer) so that the next blocking send waits.
try:
    while True:
        a.send(b"x" * 4096)
except BlockingIOError:
    pass
a.setblocking(True)


def release():
    sys.stdin.readline()
    b.setblocking(False)
    try:
        while True:
            b.recv(1 << 16)
    except BlockingIOError:
        pass


threading.Thread(target=release, daemon=True).start()
print("ready", flush=True)
a.send(b"y" * 4096)
print("done", flush=True)
