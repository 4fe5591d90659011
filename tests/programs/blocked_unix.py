"""Blocks in recv on a unix socket until a line arrives on stdin (then a helper thread sends)."""
import socket
import sys
import threading

a, b = socket.socketpair()


def release():
    sys.stdin.readline()
    b.send(b"x")


threading.Thread(target=release, daemon=True).start()
print("ready", flush=True)
a.recv(10)
print("done", flush=True)
