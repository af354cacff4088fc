#!/usr/bin/env python3
"""Collects the load benchmark's rows and renders the one table and its ratios.

  report.py add --rows F --id ID --name NAME [--wrk JSON] [--rps ..] [--p50 ..] [--p99 ..]
                [--mbps ..] [--rss-kb ..] [--errors ..] [--note ..] [--data JSON]
  report.py render --rows F --meta F        markdown on stdout

Every ratio is computed from rows of the same run; a ratio whose rows are missing says so.
"""
import argparse
import json
import sys


def load(path):
    rows = {}
    order = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                if r["id"] not in rows:
                    order.append(r["id"])
                rows[r["id"]] = r
    return rows, order


def cmd_add(a):
    row = {"id": a.id, "name": a.name}
    if a.wrk:
        w = json.loads(a.wrk)
        row.update(rps=w["rps"], p50=w["p50_ms"], p99=w["p99_ms"], mbps=w["mbps"],
                   errors=w["err_connect"] + w["err_read"] + w["err_write"] + w["err_status"]
                   + w["err_timeout"], requests=w["requests"])
        if w["err_status"]:
            row["non2xx"] = w["err_status"]
    for k in ("rps", "p50", "p99", "mbps", "rss_kb", "errors", "cpu_secs", "cpu_us"):
        v = getattr(a, k)
        if v not in (None, ""):
            row[k] = float(v)
    if row.get("cpu_secs") is not None and row.get("requests"):
        row["cpu_us"] = row["cpu_secs"] * 1e6 / row["requests"]
    if a.note:
        row["note"] = a.note
    if a.data:
        row["data"] = json.loads(a.data)
    with open(a.rows, "a") as f:
        f.write(json.dumps(row) + "\n")


def fmt(v, digits=1):
    if v is None:
        return ""
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}" if digits else f"{v:.0f}"


def fmt_ms(v):
    if v is None:
        return ""
    return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 100 else f"{v:,.0f}")


def render(rows, order, meta):
    out = []
    w = out.append
    w(f"# hubgate load benchmark, {meta.get('date', '')}")
    w("")
    w(f"Mode: {meta.get('mode')}; {meta.get('duration')} s per row after a {meta.get('warmup')} s "
      f"warm-up; wrk {meta.get('wrk_args')}.")
    w("")
    w("## Machine")
    w("")
    for k in ("host", "nproc", "cpu", "memory", "kernel", "wrk", "nginx", "node", "chp",
              "hubgate", "python", "loadavg_before", "loadavg_after", "ulimit_n", "placement"):
        if k in meta:
            w(f"- {k}: {meta[k]}")
    w("")
    w("## Results")
    w("")
    w("| row | req/s | p50 ms | p99 ms | MB/s | RSS MiB | CPU µs/req | errors | notes |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for rid in order:
        r = rows[rid]
        rss = r.get("rss_kb")
        err = r.get("errors")
        w("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], fmt(r.get("rps"), 0), fmt_ms(r.get("p50")), fmt_ms(r.get("p99")),
            fmt(r.get("mbps"), 1), fmt(rss / 1024 if rss is not None else None, 1),
            fmt(r.get("cpu_us"), 1),
            "" if err is None else f"{err:.0f}", r.get("note", "")))
    w("")
    w("RSS: resident memory of the process under test (nginx: master and workers) after the row. "
      "CPU µs/req: user and system CPU that process used during the measured run, divided by the "
      "requests: less sensitive than requests/s to whatever else shares the cores.")
    w("")
    w("## Ratios (same run)")
    w("")
    for line in ratios(rows):
        w(f"- {line}")
    w("")
    return "\n".join(out)


def get(rows, rid, key):
    r = rows.get(rid)
    if r is None:
        return None
    return r.get(key)


def ratio_line(label, num, den, fmtr=lambda x: f"{x:.2f}x", why=""):
    if num is None or den is None or den == 0:
        return f"{label}: n/a (row missing{': ' + why if why else ''})"
    return f"{label}: {fmtr(num / den)}"


def ratios(rows):
    lines = []
    hg = get(rows, "hubgate.small", "rps")
    hg2 = get(rows, "hubgate.repeat", "rps")
    base = (hg + hg2) / 2 if hg and hg2 else hg
    noise = abs(hg - hg2) / base if hg and hg2 else None
    lines.append(ratio_line("hubgate / CHP, requests/s (small)", hg,
                            get(rows, "chp.small", "rps")))
    lines.append(ratio_line("hubgate / nginx (1 worker), requests/s (small)", hg,
                            get(rows, "nginx1.small", "rps")))
    lines.append(ratio_line("hubgate / nginx (workers = cores), requests/s (small)", hg,
                            get(rows, "nginxN.small", "rps")))
    lines.append(ratio_line("hubgate p99 / nginx (workers = cores) p99 (small)",
                            get(rows, "hubgate.small", "p99"), get(rows, "nginxN.small", "p99")))
    lines.append(ratio_line("hubgate p99 / CHP p99 (small)",
                            get(rows, "hubgate.small", "p99"), get(rows, "chp.small", "p99")))
    lines.append(ratio_line("hubgate / nginx (1 worker), CPU per request (small)",
                            get(rows, "hubgate.small", "cpu_us"), get(rows, "nginx1.small", "cpu_us")))
    lines.append(ratio_line("hubgate / CHP, CPU per request (small)",
                            get(rows, "hubgate.small", "cpu_us"), get(rows, "chp.small", "cpu_us")))
    lines.append(ratio_line("hubgate / direct, MB/s (1 MiB)", get(rows, "hubgate.big", "mbps"),
                            get(rows, "direct.big", "mbps"), lambda x: f"{x * 100:.0f} %"))
    lines.append(ratio_line("hubgate / CHP, MB/s (1 MiB)", get(rows, "hubgate.big", "mbps"),
                            get(rows, "chp.big", "mbps")))
    if noise is not None:
        lines.append(f"hubgate baseline = mean of its two plain runs ({hg:,.0f} and {hg2:,.0f} "
                     f"req/s): they differ by {noise * 100:.1f} %, the noise floor of the next "
                     f"two ratios")
    lines.append(ratio_line("hubgate + auth (cached token) / hubgate, requests/s",
                            get(rows, "hubgate.auth", "rps"), base, lambda x: f"{x * 100:.1f} %"))
    def mean2(a, b, key):
        x, y = get(rows, a, key), get(rows, b, key)
        return (x + y) / 2 if x and y else (x or y)

    lines.append(ratio_line("hubgate + auth (cached token) / open route in the same process "
                            "(mean of the runs before and after), requests/s",
                            get(rows, "hubgate.auth", "rps"),
                            mean2("hubgate.authopen", "hubgate.authopen2", "rps"),
                            lambda x: f"{x * 100:.1f} %"))
    calls = (rows.get("hubgate.auth", {}).get("data") or {}).get("hub_user_calls")
    if calls is not None:
        lines.append(f"hub calls (GET /hub/api/user) during the authenticated run: {calls}")
    lines.append(ratio_line("hubgate scraped every 100 ms / hubgate, requests/s",
                            get(rows, "hubgate.scraped", "rps"), base,
                            lambda x: f"{x * 100:.1f} % (change {(x - 1) * 100:+.1f} %)"))
    per_scrape = get(rows, "hubgate.scrapecost", "cpu_us")
    if per_scrape is not None:
        lines.append(f"hubgate /metrics scraped every 100 ms, measured on an idle process: "
                     f"{per_scrape / 1000:.2f} ms CPU per scrape, {per_scrape * 10 / 1e4:.2f} % "
                     f"of one core")
    c1, c2 = get(rows, "hubgate.small", "cpu_us"), get(rows, "hubgate.repeat", "cpu_us")
    cbase = (c1 + c2) / 2 if c1 and c2 else c1
    lines.append(ratio_line("hubgate scraped / hubgate, CPU per request",
                            get(rows, "hubgate.scraped", "cpu_us"), cbase,
                            lambda x: f"{x * 100:.1f} % (change {(x - 1) * 100:+.1f} %)"))
    lines.append(ratio_line("hubgate + auth (cached token) / open route in the same process, "
                            "CPU per request", get(rows, "hubgate.auth", "cpu_us"),
                            mean2("hubgate.authopen", "hubgate.authopen2", "cpu_us"),
                            lambda x: f"{x * 100:.1f} % (change {(x - 1) * 100:+.1f} %)"))
    for who, label in (("hubgate", "hubgate"), ("chp", "CHP")):
        start = get(rows, f"{who}.start", "rss_kb")
        r = rows.get(f"{who}.add10k")
        if r and start is not None and r.get("rss_kb") is not None and (r.get("data") or {}).get("done"):
            n = r["data"]["done"]
            delta = (r["rss_kb"] - start) * 1024
            lines.append(f"{label} memory per route, empty -> {n:,} routes (one by one): "
                         f"{delta / n:,.0f} bytes (RSS +{delta / 2**20:.1f} MiB)")
        for rid in (f"{who}.table",):
            d = (rows.get(rid) or {}).get("data") or {}
            if rows.get(rid, {}).get("rss_kb") is None or d.get("rss_kb_before") is None:
                continue
            n = d["routes_after"] - d["routes_before"]
            if n > 0:
                delta = (rows[rid]["rss_kb"] - d["rss_kb_before"]) * 1024
                how = "one sync" if d.get("op") == "sync" else "one by one"
                lines.append(f"{label} memory per route, fresh process, empty -> "
                             f"{d['routes_after']:,} routes ({how}): "
                             f"{delta / n:,.0f} bytes (RSS +{delta / 2**20:.1f} MiB)")
    for who, label in (("hubgate", "hubgate"), ("chp", "CHP")):
        d = (rows.get(f"{who}.ws.large") or {}).get("data")
        if not d or not d.get("opened") or d.get("rss_kb_held") is None:
            continue
        # RSS before any websocket: the smaller hold that ran first leaves its memory in the
        # allocator, where the larger one would reuse it unseen.
        first = (rows.get(f"{who}.ws.small") or {}).get("data") or {}
        before = min(x for x in (d["rss_kb_before"], first.get("rss_kb_before")) if x is not None)
        per = (d["rss_kb_held"] - before) / d["opened"]
        lines.append(f"{label} websocket memory: {per:.1f} KiB per held connection "
                     f"({d['opened']:,} of {d['wanted']:,} opened; RSS {before / 1024:.0f} MiB "
                     f"before any websocket, {d['rss_kb_held'] / 1024:.0f} MiB while held)")
    lines.append(ratio_line("hubgate / CHP, websocket echo messages/s",
                            get(rows, "hubgate.ws.rate", "rps"), get(rows, "chp.ws.rate", "rps")))
    lines.append(ratio_line("hubgate on redis, 2 replicas / 1 replica, requests/s (small, one port)",
                            get(rows, "hubgate.redis2", "rps"), get(rows, "hubgate.redis1", "rps")))
    lines.append(ratio_line("hubgate on redis, 1 replica / hubgate (memory store), requests/s (small)",
                            get(rows, "hubgate.redis1", "rps"), hg))
    return lines


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["add", "render"])
    p.add_argument("--rows", required=True)
    p.add_argument("--meta")
    p.add_argument("--id")
    p.add_argument("--name")
    p.add_argument("--wrk")
    p.add_argument("--data")
    p.add_argument("--note")
    for k in ("rps", "p50", "p99", "mbps", "rss-kb", "errors", "cpu-secs", "cpu-us"):
        p.add_argument(f"--{k}")
    a = p.parse_args()
    if a.command == "add":
        cmd_add(a)
    else:
        rows, order = load(a.rows)
        meta = json.load(open(a.meta)) if a.meta else {}
        sys.stdout.write(render(rows, order, meta) + "\n")


if __name__ == "__main__":
    main()
