#!/usr/bin/env python3
"""Collects the load benchmark's rows and renders the one table and its ratios.

  report.py add --rows F --id ID --name NAME [--wrk JSON] [--rps ..] [--p50 ..] [--p99 ..]
                [--mbps ..] [--rss-kb ..] [--errors ..] [--cpu-secs ..] [--cpu-user-secs ..]
                [--cpu-sys-secs ..] [--ctx-vol ..] [--ctx-invol ..] [--note ..] [--data JSON]
  report.py median --rows-in F1 F2 .. --out F   one row per id: the median of each figure
  report.py render --rows F --meta F [--rows-in F1 F2 ..]   markdown on stdout (with the
                                            rounds' rows: each round's ratios to nginx too)

Every ratio is computed from rows of the same run (or, after `median`, from the medians of
rounds that each measured every row); a ratio whose rows are missing says so.
"""

import argparse
import json
import statistics
import sys

# Figures that `median` takes the median of, and which of them a row's note lists per round.
FIGURES = (
    "rps",
    "p50",
    "p99",
    "mbps",
    "rss_kb",
    "errors",
    "requests",
    "cpu_secs",
    "cpu_us",
    "user_us",
    "sys_us",
    "vcs",
    "ivcs",
)
# (1 MiB rows show MB/s, the others requests/s).
SHOWN_PER_ROUND = (("rps", "req/s", 0), ("mbps", "MB/s", 0), ("cpu_us", "CPU µs/req", 1))


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
        row.update(
            rps=w["rps"],
            p50=w["p50_ms"],
            p99=w["p99_ms"],
            mbps=w["mbps"],
            errors=w["err_connect"]
            + w["err_read"]
            + w["err_write"]
            + w["err_status"]
            + w["err_timeout"],
            requests=w["requests"],
        )
        if w["err_status"]:
            row["non2xx"] = w["err_status"]
    for k in ("rps", "p50", "p99", "mbps", "rss_kb", "errors", "cpu_secs", "cpu_us"):
        v = getattr(a, k)
        if v not in (None, ""):
            row[k] = float(v)
    n = row.get("requests")
    if row.get("cpu_secs") is not None and n:
        row["cpu_us"] = row["cpu_secs"] * 1e6 / n
    # Per request: user and kernel CPU, voluntary and involuntary context switches.
    for arg, key, scale in (
        ("cpu_user_secs", "user_us", 1e6),
        ("cpu_sys_secs", "sys_us", 1e6),
        ("ctx_vol", "vcs", 1),
        ("ctx_invol", "ivcs", 1),
    ):
        v = getattr(a, arg)
        if v not in (None, "") and n:
            row[key] = float(v) * scale / n
    if a.note:
        row["note"] = a.note
    if a.data:
        row["data"] = json.loads(a.data)
    with open(a.rows, "a") as f:
        f.write(json.dumps(row) + "\n")


def cmd_median(a):
    rounds = []
    for path in a.rows_in:
        rows, order = load(path)
        rounds.append((rows, order))
    order = []
    for _, o in rounds:
        order += [rid for rid in o if rid not in order]
    with open(a.out, "w") as f:
        for rid in order:
            present = [rows[rid] for rows, _ in rounds if rid in rows]
            row = dict(present[0])
            per_round = {}
            for k in FIGURES:
                values = [r[k] for r in present if r.get(k) is not None]
                if values:
                    row[k] = statistics.median(values)
                    per_round[k] = values
            row["rounds"] = {"n": len(present), "of": len(rounds), "values": per_round}
            f.write(json.dumps(row) + "\n")


def round_note(r):
    """The figures of each round behind a median, for the notes column."""
    rounds = r.get("rounds")
    if not rounds or rounds["of"] < 2:
        return ""
    parts = []
    for key, label, digits in SHOWN_PER_ROUND:
        if key == ("rps" if r["id"].endswith(".big") else "mbps"):
            continue
        values = rounds["values"].get(key)
        if values and len(values) > 1:
            parts.append(f"{label} " + " / ".join(fmt(v, digits) for v in values))
    what = f"median of {rounds['n']} rounds" + (
        f" (of {rounds['of']})" if rounds["n"] != rounds["of"] else ""
    )
    return f"{what}: {'; '.join(parts)}. " if parts else f"{what}. "


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


def render(rows, order, meta, rounds=()):
    out = []
    w = out.append
    w(f"# hubgate load benchmark, {meta.get('date', '')}")
    w("")
    w(
        f"Mode: {meta.get('mode')}; {meta.get('duration')} s per row "
        f"after a {meta.get('warmup')} s warm-up; wrk {meta.get('wrk_args')}."
    )
    w("")
    w("## Machine")
    w("")
    for k in (
        "host",
        "nproc",
        "cpu",
        "memory",
        "kernel",
        "wrk",
        "nginx",
        "node",
        "chp",
        "hubgate",
        "python",
        "loadavg_before",
        "loadavg_after",
        "ulimit_n",
        "placement",
    ):
        if k in meta:
            w(f"- {k}: {meta[k]}")
    w("")
    w("## Results")
    w("")
    w(
        "| row | req/s | p50 ms | p99 ms | MB/s | RSS MiB | CPU µs/req | user µs/req "
        "| kernel µs/req | ctx sw/req vol+invol | errors | notes |"
    )
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for rid in order:
        r = rows[rid]
        rss = r.get("rss_kb")
        err = r.get("errors")
        ctx = ""
        if r.get("vcs") is not None and r.get("ivcs") is not None:
            ctx = f"{r['vcs']:.2f}+{r['ivcs']:.2f}"
        w(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["name"],
                fmt(r.get("rps"), 0),
                fmt_ms(r.get("p50")),
                fmt_ms(r.get("p99")),
                fmt(r.get("mbps"), 1),
                fmt(rss / 1024 if rss is not None else None, 1),
                fmt(r.get("cpu_us"), 1),
                fmt(r.get("user_us"), 2),
                fmt(r.get("sys_us"), 2),
                ctx,
                "" if err is None else f"{err:.0f}",
                round_note(r) + r.get("note", ""),
            )
        )
    w("")
    w(
        "RSS: resident memory of the process under test (nginx: master and workers) after the row. "
        "CPU µs/req: user and system CPU that process used during the measured run, divided by the "
        "requests: less sensitive than requests/s to whatever else shares the cores; user and "
        "kernel µs/req split it. ctx sw/req: voluntary and involuntary context switches of every "
        "thread of that process (and its children), per request. With several rounds, every "
        "figure is the median of the rounds' figures for that row."
    )
    w("")
    w(f"## Ratios ({meta.get('ratios_from', 'same run')})")
    w("")
    for line in ratios(rows):
        # A subset of the rows (--rows) leaves out the ratios of the rows it did not run.
        if meta.get("rows", "all") != "all" and line.endswith("n/a (row missing)"):
            continue
        w(f"- {line}")
    w("")
    if len(rounds) > 1:
        w("## hubgate against nginx, round by round")
        w("")
        w(
            "Each ratio taken within one round (both rows measured minutes apart at most), and the "
            "median of those ratios: the figure to quote."
        )
        w("")
        for line in per_round_lines(rounds):
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
    lines.append(ratio_line("hubgate / CHP, requests/s (small)", hg, get(rows, "chp.small", "rps")))
    lines += versus_nginx(rows)
    lines.append(
        ratio_line(
            "hubgate p99 / CHP p99 (small)",
            get(rows, "hubgate.small", "p99"),
            get(rows, "chp.small", "p99"),
        )
    )
    lines.append(
        ratio_line(
            "hubgate / CHP, CPU per request (small)",
            get(rows, "hubgate.small", "cpu_us"),
            get(rows, "chp.small", "cpu_us"),
        )
    )
    lines.append(
        ratio_line(
            "hubgate / direct, MB/s (1 MiB)",
            get(rows, "hubgate.big", "mbps"),
            get(rows, "direct.big", "mbps"),
            lambda x: f"{x * 100:.0f} %",
        )
    )
    lines.append(
        ratio_line(
            "hubgate / CHP, MB/s (1 MiB)",
            get(rows, "hubgate.big", "mbps"),
            get(rows, "chp.big", "mbps"),
        )
    )
    if noise is not None:
        lines.append(
            f"hubgate baseline = mean of its two plain runs ({hg:,.0f} and {hg2:,.0f} "
            f"req/s): they differ by {noise * 100:.1f} %, the noise floor of the next "
            f"two ratios"
        )
    lines.append(
        ratio_line(
            "hubgate + auth (cached token) / hubgate, requests/s",
            get(rows, "hubgate.auth", "rps"),
            base,
            lambda x: f"{x * 100:.1f} %",
        )
    )

    def mean2(a, b, key):
        x, y = get(rows, a, key), get(rows, b, key)
        return (x + y) / 2 if x and y else (x or y)

    lines.append(
        ratio_line(
            "hubgate + auth (cached token) / open route in the same process "
            "(mean of the runs before and after), requests/s",
            get(rows, "hubgate.auth", "rps"),
            mean2("hubgate.authopen", "hubgate.authopen2", "rps"),
            lambda x: f"{x * 100:.1f} %",
        )
    )
    lines.append(
        ratio_line(
            "hubgate + auth + limits on / hubgate + auth (cached token), requests/s",
            get(rows, "hubgate.authlimits", "rps"),
            get(rows, "hubgate.auth", "rps"),
            lambda x: f"{x * 100:.1f} %",
        )
    )
    lines.append(
        ratio_line(
            "hubgate + auth + limits on / hubgate + auth (cached token), CPU per request",
            get(rows, "hubgate.authlimits", "cpu_us"),
            get(rows, "hubgate.auth", "cpu_us"),
            lambda x: f"{x * 100:.1f} % (change {(x - 1) * 100:+.1f} %)",
        )
    )
    calls = (rows.get("hubgate.auth", {}).get("data") or {}).get("hub_user_calls")
    if calls is not None:
        lines.append(f"hub calls (GET /hub/api/user) during the authenticated run: {calls}")
    lines.append(
        ratio_line(
            "hubgate scraped every 100 ms / hubgate, requests/s",
            get(rows, "hubgate.scraped", "rps"),
            base,
            lambda x: f"{x * 100:.1f} % (change {(x - 1) * 100:+.1f} %)",
        )
    )
    per_scrape = get(rows, "hubgate.scrapecost", "cpu_us")
    if per_scrape is not None:
        lines.append(
            f"hubgate /metrics scraped every 100 ms, measured on an idle process: "
            f"{per_scrape / 1000:.2f} ms CPU per scrape, {per_scrape * 10 / 1e4:.2f} % "
            f"of one core"
        )
    c1, c2 = get(rows, "hubgate.small", "cpu_us"), get(rows, "hubgate.repeat", "cpu_us")
    cbase = (c1 + c2) / 2 if c1 and c2 else c1
    lines.append(
        ratio_line(
            "hubgate scraped / hubgate, CPU per request",
            get(rows, "hubgate.scraped", "cpu_us"),
            cbase,
            lambda x: f"{x * 100:.1f} % (change {(x - 1) * 100:+.1f} %)",
        )
    )
    lines.append(
        ratio_line(
            "hubgate + auth (cached token) / open route in the same process, CPU per request",
            get(rows, "hubgate.auth", "cpu_us"),
            mean2("hubgate.authopen", "hubgate.authopen2", "cpu_us"),
            lambda x: f"{x * 100:.1f} % (change {(x - 1) * 100:+.1f} %)",
        )
    )
    for who, label in (("hubgate", "hubgate"), ("chp", "CHP")):
        start = get(rows, f"{who}.start", "rss_kb")
        r = rows.get(f"{who}.add10k")
        if (
            r
            and start is not None
            and r.get("rss_kb") is not None
            and (r.get("data") or {}).get("done")
        ):
            n = r["data"]["done"]
            delta = (r["rss_kb"] - start) * 1024
            lines.append(
                f"{label} memory per route, empty -> {n:,} routes (one by one): "
                f"{delta / n:,.0f} bytes (RSS +{delta / 2**20:.1f} MiB)"
            )
        for rid in (f"{who}.table",):
            d = (rows.get(rid) or {}).get("data") or {}
            if rows.get(rid, {}).get("rss_kb") is None or d.get("rss_kb_before") is None:
                continue
            n = d["routes_after"] - d["routes_before"]
            if n > 0:
                delta = (rows[rid]["rss_kb"] - d["rss_kb_before"]) * 1024
                how = "one sync" if d.get("op") == "sync" else "one by one"
                lines.append(
                    f"{label} memory per route, fresh process, empty -> "
                    f"{d['routes_after']:,} routes ({how}): "
                    f"{delta / n:,.0f} bytes (RSS +{delta / 2**20:.1f} MiB)"
                )
    for who, label in (("hubgate", "hubgate"), ("chp", "CHP")):
        d = (rows.get(f"{who}.ws.large") or {}).get("data")
        if not d or not d.get("opened") or d.get("rss_kb_held") is None:
            continue
        # RSS before any websocket: the smaller hold that ran first leaves its memory in the
        # allocator, where the larger one would reuse it unseen.
        first = (rows.get(f"{who}.ws.small") or {}).get("data") or {}
        before = min(x for x in (d["rss_kb_before"], first.get("rss_kb_before")) if x is not None)
        per = (d["rss_kb_held"] - before) / d["opened"]
        lines.append(
            f"{label} websocket memory: {per:.1f} KiB per held connection "
            f"({d['opened']:,} of {d['wanted']:,} opened; RSS {before / 1024:.0f} MiB "
            f"before any websocket, {d['rss_kb_held'] / 1024:.0f} MiB while held)"
        )
    lines.append(
        ratio_line(
            "hubgate / CHP, websocket echo messages/s",
            get(rows, "hubgate.ws.rate", "rps"),
            get(rows, "chp.ws.rate", "rps"),
        )
    )
    lines.append(
        ratio_line(
            "hubgate on redis, 2 replicas / 1 replica, requests/s (small, one port)",
            get(rows, "hubgate.redis2", "rps"),
            get(rows, "hubgate.redis1", "rps"),
        )
    )
    lines.append(
        ratio_line(
            "hubgate on redis, 1 replica / hubgate (memory store), requests/s (small)",
            get(rows, "hubgate.redis1", "rps"),
            hg,
        )
    )
    return lines


def versus_nginx(rows):
    """hubgate with one worker against nginx with one, and with its default workers (one per
    core) against nginx with as many: throughput, latency, CPU and context switches."""
    return [ratio_line(label, num, den) for label, num, den in versus_nginx_figures(rows)]


def per_round_lines(rounds):
    """Each hubgate/nginx ratio taken within every round, and the median of those ratios."""
    lines = []
    figures = [versus_nginx_figures(rows) for rows in rounds]
    for i, (label, _, _) in enumerate(figures[0]):
        values = [f[i][1] / f[i][2] for f in figures if f[i][1] is not None and f[i][2]]
        if not values:
            continue
        each = " / ".join(f"{v:.2f}" for v in values)
        lines.append(f"{label}: {statistics.median(values):.2f}x (rounds: {each})")
    return lines


def versus_nginx_figures(rows):
    lines = []
    for hg, ng, label in (
        ("hubgate1", "nginx1", "hubgate --workers 1 / nginx 1 worker"),
        ("hubgate", "nginxN", "hubgate default workers / nginx N workers"),
    ):

        def of(rid, key, hg=hg, ng=ng):
            return get(rows, f"{hg}.{rid}", key), get(rows, f"{ng}.{rid}", key)

        def ctx(who):
            v, i = get(rows, f"{who}.small", "vcs"), get(rows, f"{who}.small", "ivcs")
            return None if v is None or i is None else v + i

        lines.append((f"{label}, requests/s (small)", *of("small", "rps")))
        lines.append((f"{label}, p99 (small)", *of("small", "p99")))
        lines.append((f"{label}, user CPU per request (small)", *of("small", "user_us")))
        lines.append((f"{label}, kernel CPU per request (small)", *of("small", "sys_us")))
        lines.append((f"{label}, CPU per request (small)", *of("small", "cpu_us")))
        lines.append((f"{label}, context switches per request (small)", ctx(hg), ctx(ng)))
        lines.append((f"{label}, MB/s (1 MiB)", *of("big", "mbps")))
    # The floor: what hyper alone costs against nginx, and hubgate's own work on top of it.
    for num, den, label in (
        ("floor", "nginx1", "bare hyper floor / nginx 1 worker"),
        ("hubgate1", "floor", "hubgate --workers 1 / bare hyper floor"),
    ):

        def of(rid, key, num=num, den=den):
            return get(rows, f"{num}.{rid}", key), get(rows, f"{den}.{rid}", key)

        lines.append((f"{label}, requests/s (small)", *of("small", "rps")))
        lines.append((f"{label}, user CPU per request (small)", *of("small", "user_us")))
        lines.append((f"{label}, kernel CPU per request (small)", *of("small", "sys_us")))
        lines.append((f"{label}, CPU per request (small)", *of("small", "cpu_us")))
        lines.append((f"{label}, MB/s (1 MiB)", *of("big", "mbps")))
    return lines


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["add", "median", "render"])
    p.add_argument("--rows")
    p.add_argument("--rows-in", nargs="+")
    p.add_argument("--out")
    p.add_argument("--meta")
    p.add_argument("--id")
    p.add_argument("--name")
    p.add_argument("--wrk")
    p.add_argument("--data")
    p.add_argument("--note")
    for k in (
        "rps",
        "p50",
        "p99",
        "mbps",
        "rss-kb",
        "errors",
        "cpu-secs",
        "cpu-us",
        "cpu-user-secs",
        "cpu-sys-secs",
        "ctx-vol",
        "ctx-invol",
    ):
        p.add_argument(f"--{k}")
    a = p.parse_args()
    if a.command == "add":
        cmd_add(a)
    elif a.command == "median":
        cmd_median(a)
    else:
        rows, order = load(a.rows)
        meta = json.load(open(a.meta)) if a.meta else {}
        rounds = [load(path)[0] for path in a.rows_in or ()]
        sys.stdout.write(render(rows, order, meta, rounds) + "\n")


if __name__ == "__main__":
    main()
