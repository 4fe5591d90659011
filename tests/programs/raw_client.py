"""Sends raw bytes (read from standard input) on one TCP connection, then
reads whatever comes back until the peer closes or --wait seconds of silence; prints the
received bytes as hex on one line. --close-after-send closes right after sending."""
import argparse
import socket
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--wait", type=float, default=1.0)
    p.add_argument("--close-after-send", action="store_true")
    a = p.parse_args()
    data = sys.stdin.buffer.read()
    s = socket.create_connection(("127.0.0.1", a.port))
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = b""
    if not a.close_after_send:
        s.settimeout(a.wait)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    s.close()
    print(got.hex(), flush=True)


if __name__ == "__main__":
    main()
