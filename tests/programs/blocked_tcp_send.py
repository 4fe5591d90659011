"""A thread blocks in send on a loopback TCP connection whose other end does not read, until a
line arrives on stdin; then a helper thread reads everything, and the send returns."""
import socket
import sys
import threading

PAYLOAD = b"BLOCKED-SEND " + b"y" * (64 * 1024 - 13)

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()

# Fill the client's send buffer and the server's receive buffer, so that the next blocking
# send waits.
client.setblocking(False)
filled = 0
try:
    while True:
        filled += client.send(b"x" * 65536)
except BlockingIOError:
    pass
client.setblocking(True)


def release():
    sys.stdin.readline()
    left = filled + len(PAYLOAD)
    while left > 0:
        left -= len(server.recv(1 << 20))


threading.Thread(target=release, daemon=True).start()
print("ready", flush=True)
sent = client.send(PAYLOAD)
print(f"sent {sent}", flush=True)
