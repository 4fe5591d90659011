"""A Flask service instrumented by the OpenTelemetry Python SDK (run it under
`opentelemetry-instrument`): it calls NEXT with `requests` before answering, so the SDK
propagates its own context downstream."""
import os
import sys

import requests
from flask import Flask

app = Flask(__name__)
NEXT = os.environ.get("NEXT")


@app.route("/<path:p>")
def handle(p):
    body = "sdk\n"
    if NEXT:
        body += requests.get(NEXT, timeout=10).text
    return body


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
