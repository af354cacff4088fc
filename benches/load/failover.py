#!/usr/bin/env python3
"""Route writes through a hubgate on a Sentinel-watched Redis, for benches/load/failover.sh.
Prints one JSON line. Loopback only.

  failover.py latency --api API --token T [--count N]
      N adds then N deletes, one after the other on one keep-alive connection: the latency
      of each answered write (p50/p99/max, milliseconds).

  failover.py failover --api API --token T --kill PID --sentinel PORT --master NAME
      Writes one route after the other; after 200 accepted writes, SIGKILLs PID (the Redis
      primary) and keeps writing (a refused write is retried at once) until one asked after the
      kill is answered 201. Meanwhile asks the sentinel on PORT which server is the primary.
      Reports seconds from the SIGKILL to the sentinels naming another primary and to the first
      accepted write, and how many writes were refused meanwhile.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import threading
import time

# Run as a script from this folder: its neighbour is importable.
from propagation import call, connect, pct


def latency(a):
    conn = connect(a.api)
    ms, refused = [], 0
    body = json.dumps({"target": "http://127.0.0.1:9"})
    for method in ("POST", "DELETE"):
        for i in range(a.count):
            path = f"/api/routes/lat/r{i}"
            started = time.perf_counter()
            status = call(conn, method, path, a.token, body if method == "POST" else None)
            if status in (201, 204):
                ms.append((time.perf_counter() - started) * 1000)
            else:
                refused += 1
    print(
        json.dumps(
            {
                "writes": len(ms),
                "refused": refused,
                "p50_ms": round(pct(ms, 0.5), 3),
                "p99_ms": round(pct(ms, 0.99), 3),
                "max_ms": round(max(ms, default=0), 3),
            }
        )
    )


def primary_port(port, master):
    """The primary's port as the sentinel on `port` names it (RESP over a plain socket)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"SENTINEL get-master-addr-by-name {master}\r\n".encode())
            reply = s.recv(4096).decode(errors="replace").split("\r\n")
            # *2 $len ip $len port
            return int(reply[4]) if len(reply) > 4 and reply[0] == "*2" else None
    except (OSError, ValueError):
        return None


def failover(a):
    conn = connect(a.api)
    body = json.dumps({"target": "http://127.0.0.1:9"})
    before = primary_port(a.sentinel, a.master)
    switched = {}
    killed = None

    def watch():
        while "at" not in switched:
            now = primary_port(a.sentinel, a.master)
            if now is not None and now != before:
                switched["at"] = time.perf_counter()
            time.sleep(0.005)

    i, accepted, refused = 0, 0, 0
    while True:
        i += 1
        asked = time.perf_counter()
        try:
            status = call(conn, "POST", f"/api/routes/fo/r{i}", a.token, body)
        except (OSError, http.client.HTTPException):
            conn = connect(a.api)
            status = 0
        if status == 201:
            accepted += 1
            if killed is not None and asked > killed:
                resumed = time.perf_counter()
                break
        else:
            refused += 1
        if killed is None and accepted >= 200:
            threading.Thread(target=watch, daemon=True).start()
            killed = time.perf_counter()
            os.kill(a.kill, signal.SIGKILL)
        if killed is not None and time.perf_counter() - killed > 60:
            print(json.dumps({"error": "no write accepted within 60 s of the SIGKILL"}))
            return
    deadline = time.perf_counter() + 10
    while "at" not in switched and time.perf_counter() < deadline:
        time.sleep(0.01)
    print(
        json.dumps(
            {
                "sentinels_switched_s": round(switched.get("at", float("nan")) - killed, 3),
                "first_accepted_write_s": round(resumed - killed, 3),
                "refused_meanwhile": refused,
            }
        )
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["latency", "failover"])
    p.add_argument("--api", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--kill", type=int)
    p.add_argument("--sentinel", type=int)
    p.add_argument("--master", default="hub")
    a = p.parse_args()
    latency(a) if a.mode == "latency" else failover(a)


if __name__ == "__main__":
    main()
