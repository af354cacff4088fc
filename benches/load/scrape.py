#!/usr/bin/env python3
"""Scrapes a Prometheus endpoint every --interval seconds for --secs seconds, as Prometheus
would (one keep-alive connection), and prints one JSON line: scrapes, failures, last size."""

import argparse
import http.client
import json
import time
from urllib.parse import urlsplit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--secs", type=float, required=True)
    a = p.parse_args()
    u = urlsplit(a.url)
    assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    ok = failed = size = 0
    worst = 0.0
    end = time.monotonic() + a.secs
    limit = int(a.secs / a.interval) + 10  # bounded in count as well as time
    for _ in range(limit):
        start = time.monotonic()
        if start >= end:
            break
        try:
            conn.request("GET", u.path or "/metrics")
            r = conn.getresponse()
            body = r.read()
            if r.status == 200:
                ok += 1
                size = len(body)
            else:
                failed += 1
        except Exception:
            failed += 1
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
        took = time.monotonic() - start
        worst = max(worst, took)
        time.sleep(max(0.0, a.interval - took))
    print(json.dumps({"scrapes": ok, "failed": failed, "bytes": size, "worst_ms": worst * 1000}))


if __name__ == "__main__":
    main()
