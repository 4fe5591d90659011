"""A Flask service: under `opentelemetry-instrument` it is instrumented by the OpenTelemetry
Python SDK, run directly it is plain. It calls NEXT with `requests` before answering (so the SDK
propagates its own context downstream), after WORK_MS milliseconds of CPU work (0 by default:
the benchmark's "realistic service" sets it)."""
import os
import sys
import time

import requests
from flask import Flask

app = Flask(__name__)
NEXT = os.environ.get("NEXT")
WORK = float(os.environ.get("WORK_MS", "0")) / 1000.0


@app.route("/<path:p>")
def handle(p):
    end = time.perf_counter() + WORK
    n = 0
    while time.perf_counter() < end:
        n += 1
    body = "sdk\n"
    if NEXT:
        body += requests.get(NEXT, timeout=10).text
    return body


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
