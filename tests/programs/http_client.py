"""A deterministic HTTP/1.1 client for wirespan's capture tests.

It records exactly which bytes it sent and received, the descriptor and local port of its
socket, and can pause between requests (for "connection opened before the agent started").
Prints JSON lines: {"event": "connected", ...}, optionally {"event": "paused"}, then
{"event": "done", ...}.
"""
import argparse
import json
import os
import socket
import sys
import time


def read_response(sock):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("connection closed mid-body")
        body += chunk
    return head + b"\r\n\r\n" + body


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/hello")
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--mode", choices=["sendall", "writev", "writev1"], default="sendall")
    p.add_argument("--pause-after", type=int, default=0,
                   help="after this many requests, wait for a line on stdin")
    p.add_argument("--interval-ms", type=float, default=0,
                   help="wait this long after each response")
    a = p.parse_args()

    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect((a.host, a.port))
    print(json.dumps({"event": "connected", "pid": os.getpid(), "fd": sock.fileno(),
                      "local_port": sock.getsockname()[1]}), flush=True)
    sent, received = [], []
    for i in range(a.requests):
        if a.pause_after and i == a.pause_after:
            print(json.dumps({"event": "paused"}), flush=True)
            sys.stdin.readline()
        parts = [f"GET {a.path}?n={i} HTTP/1.1\r\n".encode(),
                 f"Host: {a.host}:{a.port}\r\n".encode(),
                 b"User-Agent: wirespan-test-client\r\n",
                 b"\r\n"]
        if a.mode in ("writev", "writev1"):
            # writev1: the whole request in one iovec entry.
            iov = parts if a.mode == "writev" else [b"".join(parts)]
            n = os.writev(sock.fileno(), iov)
            assert n == sum(map(len, parts)), n
        else:
            sock.sendall(b"".join(parts))
        sent.append(b"".join(parts).hex())
        received.append(read_response(sock).hex())
        if a.interval_ms:
            time.sleep(a.interval_ms / 1000)
    sock.close()
    print(json.dumps({"event": "done", "sent": sent, "received": received}), flush=True)


if __name__ == "__main__":
    main()
