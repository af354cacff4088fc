"""A fake JupyterHub single-user server for hubgate's end-to-end test.

JupyterHub's (Simple)LocalProcessSpawner starts this as `Spawner.cmd` with no
arguments: since JupyterHub 2.0 everything a single-user server needs arrives in
environment variables. We bind where `JUPYTERHUB_SERVICE_URL` says
(`http://127.0.0.1:<random port><base_url>user/<name>/`). The hub considers the
server started as soon as `GET <that URL>api` answers with any status below 500,
requested directly, not through the proxy; it also reads the
`X-JupyterHub-Version` header of that answer and only logs a warning without it.

Every request, whatever its method and path, gets a 200 JSON answer naming the
user and echoing what arrived, so the test can tell that hubgate routed the
request to this user's server and how it forwarded it. When
HUBGATE_E2E_REQUEST_LOG_DIR is set (through `Spawner.environment`), every request
is also appended as one JSON line to `<dir>/<user>.jsonl`, so a test can check
afterwards what reached the server and what never did.

Standard library only: it runs with the test venv's python, but imports nothing
from JupyterHub.
"""

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit

try:
    HUB_VERSION = version("jupyterhub")
except PackageNotFoundError:
    HUB_VERSION = None

USER = os.environ.get("JUPYTERHUB_USER", "")
SERVER_NAME = os.environ.get("JUPYTERHUB_SERVER_NAME", "")
SERVICE_URL = os.environ["JUPYTERHUB_SERVICE_URL"]
REQUEST_LOG_DIR = os.environ.get("HUBGATE_E2E_REQUEST_LOG_DIR")
REQUEST_LOG_LOCK = threading.Lock()


def record(entry):
    """Append one request to this user's request log, a whole line at a time."""
    if not REQUEST_LOG_DIR:
        return
    os.makedirs(REQUEST_LOG_DIR, exist_ok=True)
    line = json.dumps(entry) + "\n"
    with REQUEST_LOG_LOCK:
        with open(os.path.join(REQUEST_LOG_DIR, USER + ".jsonl"), "a") as f:
            f.write(line)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-singleuser/1"

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        request_body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        echo = {
            "server": "fake-singleuser",
            "user": USER,
            "server_name": SERVER_NAME,
            "method": self.command,
            "path": path,
            "query": query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_length": len(request_body),
        }
        # Recorded before answering, so whoever got the answer finds it in the log.
        record(echo)
        body = json.dumps(echo).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if HUB_VERSION:
            self.send_header("X-JupyterHub-Version", HUB_VERSION)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = answer

    def log_message(self, fmt, *args):
        sys.stderr.write(f"[fake-singleuser {USER}] {self.address_string()} {fmt % args}\n")


def exit_with_parent():
    """Stop when the hub that spawned us is gone.

    The spawner starts us in a new session, so a hub that dies without stopping
    its servers (killed by a failing test) would otherwise leave us running.
    """
    parent = os.getppid()
    while True:
        time.sleep(1)
        if os.getppid() != parent:
            os._exit(0)


def main():
    url = urlsplit(SERVICE_URL)
    server = ThreadingHTTPServer((url.hostname, url.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=exit_with_parent, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stderr.write(
        f"[fake-singleuser {USER}] listening on {url.hostname}:{url.port} for {SERVICE_URL}\n"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        # The spawner stops us with SIGINT first.
        pass


if __name__ == "__main__":
    main()
