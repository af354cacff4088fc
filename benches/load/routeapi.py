#!/usr/bin/env python3
"""Drives a proxy's route API (CHP's /api/routes, hubgate's /api/proxy) for the load benchmark
and prints one JSON line per command. One keep-alive connection, as JupyterHub uses; each figure
includes this client's own cost (a few tens of microseconds per request).

  add   --count N [--start S] [--time-limit SECS]   POST /api/routes/user/u<i>, one by one
  sync  --count N                                    POST /api/proxy with N routes at once
  list                                               GET /api/routes: time and size

Route data: {"target": --target} plus {"user": "u<i>"} with --with-user. --ws-index I gives
route u<I> --ws-target instead (the websocket echo backend). Loopback only.
"""

import argparse
import http.client
import json
import time
from urllib.parse import urlsplit


def connect(api):
    u = urlsplit(api)
    assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
    return http.client.HTTPConnection(u.hostname, u.port, timeout=600)


def route_data(a, i):
    target = a.ws_target if (a.ws_index is not None and i == a.ws_index) else a.target
    data = {"target": target}
    if a.with_user:
        data["user"] = f"u{i}"
        data["server_name"] = ""
    return data


def call(conn, method, path, token, body=None):
    headers = {"Authorization": f"token {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r.status, data


def pct(sorted_values, p):
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values), max(1, int(len(sorted_values) * p + 0.999999))) - 1
    return sorted_values[i]


def cmd_add(a, conn):
    took = []
    errors = 0
    started = time.monotonic()
    timed_out = False
    for i in range(a.start, a.start + a.count):
        if time.monotonic() - started > a.time_limit:
            timed_out = True
            break
        body = json.dumps(route_data(a, i))
        t = time.perf_counter()
        status, _ = call(conn, "POST", f"/api/routes/user/u{i}", a.token, body)
        took.append((time.perf_counter() - t) * 1000)
        if status != 201:
            errors += 1
            if errors <= 3:
                print(json.dumps({"warning": f"POST u{i} answered {status}"}), flush=True)
    total = time.monotonic() - started
    s = sorted(took)
    return {
        "op": "add",
        "wanted": a.count,
        "done": len(took),
        "errors": errors,
        "total_s": total,
        "per_sec": len(took) / total if total else 0,
        "p50_ms": pct(s, 0.5),
        "p99_ms": pct(s, 0.99),
        "max_ms": s[-1] if s else 0,
        "timed_out": timed_out,
    }


def cmd_sync(a, conn):
    routes = {f"/user/u{i}": route_data(a, i) for i in range(a.start, a.start + a.count)}
    body = json.dumps(routes)
    t = time.perf_counter()
    status, data = call(conn, "POST", "/api/proxy", a.token, body)
    secs = time.perf_counter() - t
    try:
        answer = json.loads(data)
    except ValueError:
        answer = data[:200].decode(errors="replace")
    return {
        "op": "sync",
        "routes": a.count,
        "status": status,
        "secs": secs,
        "request_bytes": len(body),
        "answer": answer,
    }


def cmd_list(a, conn):
    t = time.perf_counter()
    status, data = call(conn, "GET", "/api/routes", a.token)
    secs = time.perf_counter() - t
    try:
        n = len(json.loads(data))
    except ValueError:
        n = -1
    return {"op": "list", "status": status, "secs": secs, "bytes": len(data), "routes": n}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["add", "sync", "list"])
    p.add_argument("--api", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--target", default="")
    p.add_argument("--ws-target", default="")
    p.add_argument("--ws-index", type=int)
    p.add_argument("--with-user", action="store_true")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=600)
    a = p.parse_args()
    conn = connect(a.api)
    out = {"add": cmd_add, "sync": cmd_sync, "list": cmd_list}[a.command](a, conn)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
