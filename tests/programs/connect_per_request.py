"""A client for wirespan's tests that opens a new connection for each request: N requests
(GET /n) to 127.0.0.1:PORT at RATE per second, one thread, each on its own connection
(Connection: close). Prints its pid at the end."""
import os
import socket
import sys
import time


def main():
    port, n, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % i)
            while s.recv(65536):
                pass
    print(os.getpid())


if __name__ == "__main__":
    main()
