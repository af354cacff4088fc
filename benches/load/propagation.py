#!/usr/bin/env python3
"""How long a route change made through one hubgate replica takes to reach another (Redis store),
for the load benchmark. Prints one JSON line.

  propagation.py --writer API --reader API --token T --target URL [--count N]

For each of N routes: POST /api/routes/prop/r<i> on the writer, then GET /api/routes/prop/r<i>
on the reader as fast as one keep-alive connection allows until it answers 200. The delay is
from just before the POST to the first 200: it includes the POST itself (reported apart as
write_*) and up to one GET round trip of polling; after_answer_* is the part after the writer
answered 201 (what the hub, told "done", could see as the other replica lagging). Then the
same for DELETE (until 404).
Loopback only.
"""

import argparse
import http.client
import json
import time
from urllib.parse import urlsplit


def connect(api):
    u = urlsplit(api)
    assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
    return http.client.HTTPConnection(u.hostname, u.port, timeout=30)


def call(conn, method, path, token, body=None):
    headers = {"Authorization": f"token {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    r.read()
    return r.status


def pct(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    i = min(len(values), max(1, int(len(values) * p + 0.999999))) - 1
    return values[i]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--writer", required=True)
    p.add_argument("--reader", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--limit-secs", type=float, default=5.0, help="give up on one change after this")
    a = p.parse_args()
    w, r = connect(a.writer), connect(a.reader)
    delays, writes, after, lost = [], [], [], 0
    for op in ("add", "delete"):
        for i in range(a.count):
            path = f"/api/routes/prop/r{i}"
            started = time.perf_counter()
            if op == "add":
                status = call(w, "POST", path, a.token, json.dumps({"target": a.target}))
                want = 200
                ok = status == 201
            else:
                status = call(w, "DELETE", path, a.token)
                want = 404
                ok = status == 204
            wrote = time.perf_counter()
            if not ok:
                lost += 1
                continue
            while call(r, "GET", path, a.token) != want:
                if time.perf_counter() - started > a.limit_secs:
                    lost += 1
                    break
            else:
                seen = time.perf_counter()
                delays.append((seen - started) * 1000)
                writes.append((wrote - started) * 1000)
                after.append((seen - wrote) * 1000)
    print(
        json.dumps(
            {
                "changes": len(delays),
                "failed": lost,
                "p50_ms": round(pct(delays, 0.50), 3),
                "p99_ms": round(pct(delays, 0.99), 3),
                "max_ms": round(max(delays, default=0), 3),
                "write_p50_ms": round(pct(writes, 0.50), 3),
                "write_p99_ms": round(pct(writes, 0.99), 3),
                "after_answer_p50_ms": round(pct(after, 0.50), 3),
                "after_answer_p99_ms": round(pct(after, 0.99), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
