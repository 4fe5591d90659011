"""Numbered exchanges for wirespan's tests: each answer's status tells which request it answers.

`numbered.py PORT`: an HTTP/1.1 keep-alive server answering GET /N with status 200 + N % 4
and a one-byte body.
`numbered.py PORT SECONDS`: GET /0, /1, ... on one keep-alive connection for SECONDS,
checking each status; prints the number of requests sent and of wrong answers.
"""
import http.client
import http.server
import sys
import time


def status_of(n):
    return 200 + n % 4


class Numbered(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        # One write: a head and a body written apart wait for the delayed ACK (Nagle).
        status = status_of(int(self.path[1:]))
        self.wfile.write(b"HTTP/1.1 %d N\r\nContent-Length: 1\r\n\r\nx" % status)

    def log_message(self, *args):
        pass


def serve(port):
    http.server.HTTPServer(("127.0.0.1", port), Numbered).serve_forever()


def get(port, seconds):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    end = time.monotonic() + seconds
    n = wrong = 0
    while time.monotonic() < end:
        conn.request("GET", "/%d" % n)
        r = conn.getresponse()
        r.read()
        wrong += r.status != status_of(n)
        n += 1
    conn.close()
    print(n, wrong, flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        get(int(sys.argv[1]), float(sys.argv[2]))
    else:
        serve(int(sys.argv[1]))
