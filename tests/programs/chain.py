"""A Python service for wirespan's span tests: a thread-per-request HTTP/1.1 server that,
given --next, calls the next service (a new connection per call) before it answers.

With --hop-cpus, each request's thread runs on the first CPU it may use while it reads the
request and answers, and on the second while it calls on: its calls land in two CPUs' rings.

/fail answers 500 without calling on; /login answers with a Set-Cookie; /slow waits 60 s
before answering. Headers are not forwarded unless --forward is given. --token is accepted
and unused (the secrets test puts a secret on the command line).
"""
import argparse
import http.client
import os
import time
import http.server
import socketserver
import urllib.parse

ARGS = None
CPUS = sorted(os.sched_getaffinity(0))


def hop(i):
    """Moves the calling thread to CPUS[i] (it returns on that CPU) with --hop-cpus."""
    if ARGS.hop_cpus:
        os.sched_setaffinity(0, {CPUS[i]})


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without this, Nagle's algorithm holds the body
    # until the client's delayed ACK (40 ms a request on keep-alive connections).
    disable_nagle_algorithm = True

    def handle(self):
        hop(0)
        super().handle()

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        self.do_GET()

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(60)
        if self.path.startswith("/login"):
            body = b"welcome\n"
            self.send_response(200)
            self.send_header("Set-Cookie", "session=SECRET-SET-COOKIE-77; HttpOnly")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path.startswith("/fail"):
            self.answer(500, b"failed\n")
            return
        body = b"python\n"
        if ARGS.next:
            u = urllib.parse.urlparse(ARGS.next)
            headers = {}
            if ARGS.forward and self.headers.get("traceparent"):
                headers["traceparent"] = self.headers["traceparent"]
            hop(1)
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
            c.request("GET", (u.path or "/") + "?from=python", headers=headers)
            r = c.getresponse()
            body += r.read()
            c.close()
            hop(0)
        self.answer(200, body)

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--next")
    p.add_argument("--forward", action="store_true")
    p.add_argument("--token")
    p.add_argument("--hop-cpus", action="store_true")
    ARGS = p.parse_args()
    Server(("127.0.0.1", ARGS.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
