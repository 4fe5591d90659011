"""A small HTTP/1.1 keep-alive server for wirespan's capture tests.

/hello answers a short text; /big answers a 100,000-byte body written with one call, larger
than the kernel's per-call prefix.
"""
import argparse
import http.server
import socket
import socketserver

BIG = bytes((i * 7) % 251 for i in range(100_000))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = BIG if self.path.startswith("/big") else b"hello from python\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    if ":" in a.host:
        Server.address_family = socket.AF_INET6
    Server((a.host, a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
