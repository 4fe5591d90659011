"""Sends --count GET requests in one write on one connection (HTTP/1.1 pipelining) and reads
the responses in order."""
import argparse
import socket


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=5)
    a = p.parse_args()
    s = socket.create_connection(("127.0.0.1", a.port))
    reqs = b"".join(
        b"GET /p/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % i for i in range(a.count)
    )
    s.sendall(reqs)
    f = s.makefile("rb")
    for _ in range(a.count):
        status = f.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        length = 0
        while True:
            line = f.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        f.read(length)
    s.close()


if __name__ == "__main__":
    main()
