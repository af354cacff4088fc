#!/usr/bin/env python3
"""A tiny stand-in for JupyterHub's API, for the load benchmark's authenticated rows.

Answers, under /hub/api:
  GET  /hub/api                  {"version": "6"}            (hubgate's readiness probe)
  GET  /hub/api/user             the user model for --token  (hubgate's credential check)
  POST /hub/api/proxy            200                          (hubgate's start-up handshake)
and GET /_stats with the number of calls per endpoint, so the benchmark can show that a cached
token costs about one hub call for a whole run. Loopback only; exits after --secs.
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNTS = {}
LOCK = threading.Lock()


def count(name):
    with LOCK:
        COUNTS[name] = COUNTS.get(name, 0) + 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakehub"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/_stats":
            with LOCK:
                return self.reply(200, dict(COUNTS))
        if path == "/hub/api":
            count("root")
            return self.reply(200, {"version": "6"})
        if path == "/hub/api/user":
            count("user")
            auth = self.headers.get("Authorization", "")
            if auth.split(None, 1)[-1:] == [self.server.token]:
                return self.reply(
                    200,
                    {
                        "kind": "user",
                        "name": self.server.user,
                        "admin": False,
                        "groups": [],
                        "scopes": [f"access:servers!user={self.server.user}"],
                        "session_id": None,
                    },
                )
            return self.reply(403, {"status": 403, "message": "bad token"})
        count("other")
        return self.reply(404, {"status": 404, "message": "not here"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.split("?", 1)[0].rstrip("/") == "/hub/api/proxy":
            count("proxy")
            return self.reply(200, {})
        count("other")
        return self.reply(404, {"status": 404, "message": "not here"})

    do_PATCH = do_POST


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--user", default="u5000")
    p.add_argument("--secs", type=float, default=3600)
    a = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    server.token = a.token
    server.user = a.user
    threading.Timer(a.secs, server.shutdown).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
