#!/usr/bin/env python3
"""The load side of the soak test (benches/load/soak.sh): backends, route churn, HTTP and
websocket traffic, sampling of the proxy process, the verdict and the report.

One asyncio process, standard library only, loopback only:

- a pool of small HTTP/1.1 backends (keep-alive; 64-byte answers, 64 KiB for paths ending in
  `/big`), on ports below the ephemeral range so a stopped one can always start again on the
  same port;
- --routes routes `/soak/r<n>` spread over the backends, plus `/soak/ws` to the websocket echo
  backend that soak.sh starts (examples/wsload echo);
- every --churn-every seconds --churn-routes routes are deleted and as many new ones added, so
  the table keeps its size while its keys move on;
- every --flap-every seconds the backends stopped last time start again and --flap-backends
  others stop (listener closed, open connections dropped): their routes answer 503 meanwhile;
- HTTP traffic at a bounded rate (--rate) over --concurrency keep-alive connections (recycled
  every 200 requests): 85 % GET, 10 % POST with a 1-16 KiB body, 5 % GET of 64 KiB;
- --websockets websockets open at any time, opened and closed continuously: each lives 2-15 s
  with a message and its echo about every second, 4 in 5 end with a close handshake, the rest
  by dropping the connection. A steady number, rather than bursts, so that the descriptor
  count it samples does not swing with the phase of a burst;
- every --sample-every seconds: the proxy's open descriptors (/proc/<pid>/fd, split by
  /proc/net/tcp into client, upstream and websocket-upstream connections), VmRSS and Threads
  (/proc/<pid>/status), its routes and open websockets (its /metrics), the p99 of
  hubgate_request_duration_seconds over the interval (bucket deltas), and the client's own
  p50/p99 and status counts over the interval.

At the end it prints the first and last samples and the verdict, writes the report (markdown)
and exits 1 (FAIL) when descriptors or RSS grew once warm: the mean of the last quarter of the
samples against the mean of the second quarter, beyond --fd-tolerance / --rss-tolerance
(relative) or an absolute floor (--fd-floor descriptors, --rss-floor-kb), whichever is larger:
below the floor a difference is noise at the sizes a short run sees. It also fails when the
proxy dies, more than 0.5 % of the requests or websockets get no answer, or an echo comes back
wrong.

Run it through soak.sh, which builds and starts hubgate and the echo backend and cleans up.
"""

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import re
import signal
import statistics
import sys
import time

API_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0
SMALL = b"x" * 64
BIG = b"y" * 65536


def log(msg):
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] soak: {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Minimal HTTP/1.1 on asyncio streams (both sides are ours or hubgate; no dependencies).


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return first, headers


async def read_body(reader, headers, until_eof=False):
    """The body's length; reads Content-Length, chunked, or (answers only) up to EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # Trailers, then the empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return total
            await reader.readexactly(size + 2)
            total += size
    if "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            await reader.readexactly(n)
        return n
    if until_eof:
        return len(await reader.read())
    return 0


class Backend:
    """One HTTP backend that can be stopped and started again on the same port."""

    def __init__(self, port):
        self.port = port
        self.server = None
        self.writers = set()
        self.served = 0

    @property
    def up(self):
        return self.server is not None

    async def start(self):
        self.server = await asyncio.start_server(
            self.handle, "127.0.0.1", self.port, reuse_address=True, backlog=1024
        )

    async def stop(self):
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        for w in list(self.writers):
            w.close()
        try:
            await asyncio.wait_for(server.wait_closed(), 5)
        except (asyncio.TimeoutError, Exception):
            pass

    async def handle(self, reader, writer):
        self.writers.add(writer)
        try:
            while True:
                first, headers = await asyncio.wait_for(read_head(reader), 30)
                await asyncio.wait_for(read_body(reader, headers), 30)
                parts = first.split(" ")
                path = parts[1] if len(parts) > 1 else "/"
                body = BIG if path.split("?")[0].endswith("/big") else SMALL
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
                    % len(body)
                    + body
                )
                await writer.drain()
                self.served += 1
                if headers.get("connection", "").lower() == "close":
                    break
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.TimeoutError,
            ConnectionError,
            ValueError,
            OSError,
        ):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


class NoAnswer(Exception):
    """The request got no HTTP answer (reset, closed, timed out)."""


class Client:
    """One keep-alive connection to an address, reopened when needed."""

    def __init__(self, port, recycle=200):
        self.port = port
        self.recycle = recycle
        self.reader = self.writer = None
        self.uses = 0

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
        self.uses = 0

    async def request(self, method, path, headers=None, body=b"", timeout=REQUEST_TIMEOUT):
        """Status and body length. A failure on a reused connection before any answer is
        retried once on a fresh one (the server may close an idle keep-alive connection)."""
        for attempt in (0, 1):
            reused = self.writer is not None
            try:
                return await asyncio.wait_for(
                    self._exchange(method, path, headers or {}, body), timeout
                )
            except asyncio.TimeoutError as e:
                self.close()
                raise NoAnswer("timeout") from e
            except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as e:
                self.close()
                if not (reused and attempt == 0):
                    raise NoAnswer(type(e).__name__) from e

    async def _exchange(self, method, path, headers, body):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        first, rheaders = await read_head(self.reader)
        status = int(first.split(" ")[1])
        closing = rheaders.get("connection", "").lower() == "close"
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        length = 0 if no_body else await read_body(self.reader, rheaders, until_eof=closing)
        self.uses += 1
        if closing or self.uses >= self.recycle:
            self.close()
        return status, length


def ws_frame(opcode, payload):
    """A masked (client) websocket frame with FIN set."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def ws_read(reader):
    """(opcode, payload) of the next frame (the echo server sends whole, unfragmented ones)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    mask = await reader.readexactly(4) if b1 & 0x80 else None
    payload = await reader.readexactly(n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload


# --------------------------------------------------------------------------------------------
# The proxy process and its metrics.


def proc_status(pid):
    """(open descriptors, VmRSS KiB, threads) of pid, or None when it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = threads = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        return fds, rss, threads
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def proxy_sockets(pid):
    """Inodes of the sockets pid holds open."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def tcp_table():
    """{inode: (local port, remote port, state)} for every TCP socket of this namespace."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 10:
                        continue
                    local = int(cols[1].rsplit(":", 1)[1], 16)
                    remote = int(cols[2].rsplit(":", 1)[1], 16)
                    table[cols[9]] = (local, remote, cols[3])
        except OSError:
            pass
    return table


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text):
    """{name: total over all series}, and the duration histogram as {le: cumulative count}."""
    totals, buckets = {}, {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        totals[name] = totals.get(name, 0.0) + v
        if name == "hubgate_request_duration_seconds_bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
                buckets[bound] = buckets.get(bound, 0.0) + v
    return totals, buckets


def histogram_quantile(q, now, before):
    """The upper bound of the bucket holding quantile q of what was observed between two
    scrapes (cumulative buckets), in seconds; None when nothing was observed."""
    bounds = sorted(now)
    delta = [(b, now[b] - before.get(b, 0.0)) for b in bounds]
    total = delta[-1][1] if delta else 0
    if total <= 0:
        return None
    for b, c in delta:
        if c >= q * total:
            return b
    return bounds[-1]


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))]


# --------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args):
        self.a = args
        self.backends = []
        self.routes = []  # keys currently in the table, as traffic may use them
        self.next_route = 0
        self.api = Client(args.api_port, recycle=10_000)
        self.metrics = Client(args.metrics_port, recycle=10_000)
        self.interval = self.fresh_interval()
        self.totals = {"requests": 0, "no_answer": 0, "by_status": {}, "no_answer_kinds": {}}
        self.api_errors = 0
        self.api_calls = 0
        self.churned = 0
        self.flaps = 0
        self.restart_failures = 0
        self.samples = []
        self.proxy_died = False
        self.ws = {
            "opened": 0,
            "refused": 0,
            "errors": 0,
            "messages": 0,
            "bad_echo": 0,
            "closed": 0,
            "dropped": 0,
        }
        self.ws_rtts = []

    @staticmethod
    def fresh_interval():
        return {"latencies": [], "by_status": {}, "no_answer": 0}

    # -- setup ---------------------------------------------------------------------------------

    async def start_backends(self):
        port = self.a.backend_base
        while len(self.backends) < self.a.backends and port < 32000:
            b = Backend(port)
            port += 1
            try:
                await b.start()
            except OSError:
                continue
            self.backends.append(b)
        if len(self.backends) < self.a.backends:
            raise SystemExit(f"soak: could not bind {self.a.backends} backends")

    async def api_call(self, method, key, body=b""):
        self.api_calls += 1
        headers = {"Authorization": "token " + self.a.token}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            status, _ = await self.api.request(
                method, "/api/routes" + key, headers, body, timeout=API_TIMEOUT
            )
        except NoAnswer as e:
            self.api_errors += 1
            log(f"API {method} {key}: no answer ({e})")
            return None
        if status >= 300 and not (method == "DELETE" and status == 404):
            self.api_errors += 1
            log(f"API {method} {key}: {status}")
        return status

    async def add_route(self, key, port):
        body = json.dumps({"target": f"http://127.0.0.1:{port}"}).encode()
        return await self.api_call("POST", key, body)

    async def new_route(self):
        key = f"/soak/r{self.next_route}"
        self.next_route += 1
        backend = random.choice(self.backends)
        if await self.add_route(key, backend.port) == 201:
            self.routes.append(key)

    # -- the load ------------------------------------------------------------------------------

    async def traffic_worker(self, slots, deadline):
        client = Client(self.a.proxy_port)
        try:
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(slots.get(), 1)
                except asyncio.TimeoutError:
                    continue
                if not self.routes:
                    continue
                key = random.choice(self.routes)
                roll = random.random()
                if roll < 0.85:
                    method, path, body = "GET", key + f"/x?n={random.randrange(1000)}", b""
                elif roll < 0.95:
                    method, path = "POST", key + "/upload"
                    body = os.urandom(random.randint(1024, 16384))
                else:
                    method, path, body = "GET", key + "/big", b""
                t = time.monotonic()
                try:
                    status, _ = await client.request(method, path, body=body)
                except NoAnswer as e:
                    self.interval["no_answer"] += 1
                    self.totals["no_answer"] += 1
                    kinds = self.totals["no_answer_kinds"]
                    kinds[str(e)] = kinds.get(str(e), 0) + 1
                    continue
                self.interval["latencies"].append(time.monotonic() - t)
                s = str(status)
                self.interval["by_status"][s] = self.interval["by_status"].get(s, 0) + 1
                self.totals["by_status"][s] = self.totals["by_status"].get(s, 0) + 1
                self.totals["requests"] += 1
        finally:
            client.close()

    async def pace(self, slots, deadline):
        """Hands out RATE request slots per second; unused ones do not pile up."""
        period = 1.0 / self.a.rate
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = time.monotonic()
            if slots.qsize() < self.a.concurrency * 2:
                slots.put_nowait(None)

    async def churn(self, deadline):
        while time.monotonic() < deadline:
            await asyncio.sleep(self.a.churn_every)
            n = min(self.a.churn_routes, len(self.routes))
            gone = random.sample(self.routes, n)
            for key in gone:
                self.routes.remove(key)
            for key in gone:
                await self.api_call("DELETE", key)
            for _ in range(n):
                await self.new_route()
            self.churned += n

    async def flap(self, deadline):
        stopped = []
        while time.monotonic() < deadline:
            await asyncio.sleep(self.a.flap_every)
            for b in stopped:
                try:
                    await b.start()
                except OSError as e:
                    self.restart_failures += 1
                    log(f"backend {b.port} did not start again: {e}")
            running = [b for b in self.backends if b.up]
            stopped = random.sample(running, min(self.a.flap_backends, len(running)))
            for b in stopped:
                await b.stop()
            self.flaps += len(stopped)
        for b in stopped:
            try:
                await b.start()
            except OSError:
                pass

    async def websocket(self, deadline):
        """One websocket after another through hubgate, each open for 2-15 s with a message
        and its echo about every second; 4 in 5 end with a close handshake, the others by
        dropping the connection."""
        errors = (
            asyncio.IncompleteReadError,
            asyncio.TimeoutError,
            ConnectionError,
            OSError,
            ValueError,
        )
        while time.monotonic() < deadline:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.a.proxy_port), 5
                )
                key = base64.b64encode(os.urandom(16)).decode()
                writer.write(
                    (
                        f"GET /soak/ws HTTP/1.1\r\nHost: 127.0.0.1:{self.a.proxy_port}\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                    ).encode()
                )
                first, _ = await asyncio.wait_for(read_head(reader), REQUEST_TIMEOUT)
                if first.split(" ")[1] != "101":
                    self.ws["refused"] += 1
                    await asyncio.sleep(1)
                    continue
                self.ws["opened"] += 1
                end = min(deadline, time.monotonic() + random.uniform(2, 15))
                while time.monotonic() < end:
                    payload = os.urandom(random.randint(8, 512))
                    t = time.monotonic()
                    writer.write(ws_frame(2, payload))
                    await writer.drain()
                    while True:
                        opcode, echo = await asyncio.wait_for(ws_read(reader), REQUEST_TIMEOUT)
                        if opcode in (9, 10):  # ping, pong
                            continue
                        break
                    self.ws_rtts.append(time.monotonic() - t)
                    self.ws["messages"] += 1
                    if echo != payload:
                        self.ws["bad_echo"] += 1
                    await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
                if random.random() < 0.8:
                    writer.write(ws_frame(8, (1000).to_bytes(2, "big")))
                    await writer.drain()
                    try:
                        # The close frame back, or the end of the stream.
                        await asyncio.wait_for(ws_read(reader), 2)
                    except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                        pass
                    self.ws["closed"] += 1
                else:
                    self.ws["dropped"] += 1
            except errors:
                self.ws["errors"] += 1
                await asyncio.sleep(0.5)
            finally:
                if writer is not None:
                    writer.close()

    # -- sampling ------------------------------------------------------------------------------

    async def scrape(self):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.a.metrics_port), 5
            )
            try:
                writer.write(
                    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
            text = data.split(b"\r\n\r\n", 1)[1].decode("utf-8", "replace")
            if "chunked" in data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower():
                text = dechunk(text)
            return parse_metrics(text)
        except (OSError, asyncio.TimeoutError, IndexError, ValueError) as e:
            log(f"scraping /metrics failed: {e}")
            return {}, {}

    async def sampler(self, deadline, started):
        _, before = await self.scrape()
        next_at = started
        while next_at < deadline - 0.5:
            # Anchored to the start, so a slow scrape does not shift every later sample.
            next_at = min(next_at + self.a.sample_every, deadline)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            st = proc_status(self.a.pid)
            if st is None:
                self.proxy_died = True
                log(f"the proxy (pid {self.a.pid}) is gone")
                return
            sockets = proxy_sockets(self.a.pid)
            tcp = tcp_table()
            ports = {b.port for b in self.backends}
            clients = upstream = ws_up = 0
            for inode in sockets:
                local, remote, state = tcp.get(inode, (0, 0, ""))
                if state == "0A":  # listening
                    continue
                if local in (self.a.proxy_port, self.a.api_port, self.a.metrics_port):
                    clients += 1
                elif remote in ports:
                    upstream += 1
                elif remote == self.a.ws_port:
                    ws_up += 1
            totals, buckets = await self.scrape()
            iv, self.interval = self.interval, self.fresh_interval()
            lat = iv["latencies"]
            p99_hist = histogram_quantile(0.99, buckets, before) if buckets else None
            before = buckets or before
            codes = iv["by_status"]
            sample = {
                "t": round(time.monotonic() - started, 1),
                "fds": st[0],
                "rss_kb": st[1],
                "threads": st[2],
                "sockets": len(sockets),
                "clients": clients,
                "upstream": upstream,
                "ws_upstream": ws_up,
                "routes": int(totals.get("hubgate_routes", -1)),
                "ws_open": int(totals.get("hubgate_active_websockets", -1)),
                "requests": len(lat),
                "ok": codes.get("200", 0),
                "s503": codes.get("503", 0),
                "s404": codes.get("404", 0),
                "other": sum(v for k, v in codes.items() if k not in ("200", "503", "404")),
                "no_answer": iv["no_answer"],
                "p50_ms": ms(percentile(lat, 0.5)),
                "p99_ms": ms(percentile(lat, 0.99)),
                "hub_p99_ms": ms(p99_hist),
                "backends_up": sum(1 for b in self.backends if b.up),
            }
            self.samples.append(sample)
            log(
                (
                    "t={t:5.0f}s fds={fds} (clients {clients}, upstream {upstream}, "
                    "ws {ws_upstream}) rss={rss_kb}KiB threads={threads} routes={routes} "
                    "ws_open={ws_open} req={requests} 503={s503} noans={no_answer} "
                    "p99={p99_ms}ms hg_p99<={hub_p99_ms}ms"
                ).format_map(sample)
            )

    # -- the run -------------------------------------------------------------------------------

    async def run(self):
        a = self.a
        await self.start_backends()
        log(
            f"{len(self.backends)} backends on "
            f"127.0.0.1:{self.backends[0].port}-{self.backends[-1].port}"
        )
        t = time.monotonic()
        if await self.add_route("/soak/ws", a.ws_port) != 201:
            raise SystemExit("soak: adding the websocket route failed")
        while len(self.routes) < a.routes and time.monotonic() - t < 300:
            await self.new_route()
        if len(self.routes) < a.routes:
            raise SystemExit(f"soak: only {len(self.routes)} of {a.routes} routes added")
        log(f"{len(self.routes)} routes added in {time.monotonic() - t:.1f} s")
        with open(a.ready_file, "w") as f:
            f.write("ready\n")
        started = time.monotonic()
        # The load runs a little past the last sample, so that sample sees it at full strength
        # rather than winding down.
        deadline = started + a.seconds + 2
        slots = asyncio.Queue()
        tasks = [
            asyncio.create_task(self.pace(slots, deadline)),
            asyncio.create_task(self.churn(deadline)),
            asyncio.create_task(self.flap(deadline)),
        ]
        tasks += [
            asyncio.create_task(self.traffic_worker(slots, deadline)) for _ in range(a.concurrency)
        ]
        tasks += [asyncio.create_task(self.websocket(deadline)) for _ in range(a.websockets)]
        sampler = asyncio.create_task(self.sampler(started + a.seconds, started))
        await sampler
        # Everything is bounded by the deadline; give stragglers a moment, then cancel.
        done, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT + 5)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                log(f"task failed: {task.exception()!r}")
        for b in self.backends:
            await b.stop()
        self.api.close()


def ms(seconds):
    if seconds is None:
        return None
    if seconds == float("inf"):
        return "inf"
    return round(seconds * 1000, 2)


def dechunk(text):
    out, rest = [], text
    while rest:
        size_line, _, rest = rest.partition("\r\n")
        size = int(size_line.split(";")[0] or "0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Verdict and report.


def quarter_means(samples, key):
    n = len(samples)
    q = max(1, n // 4)
    second = samples[q : 2 * q] or samples[:1]
    last = samples[n - q :] or samples[-1:]
    return statistics.mean(s[key] for s in second), statistics.mean(s[key] for s in last)


def slope_per_minute(samples, key):
    """Least-squares slope of key against time, per minute (informational)."""
    if len(samples) < 2:
        return 0.0
    ts = [s["t"] for s in samples]
    vs = [s[key] for s in samples]
    mt, mv = statistics.mean(ts), statistics.mean(vs)
    var = sum((t - mt) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return 60 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / var


def verdict(soak):
    a = soak.a
    samples = soak.samples
    reasons, notes = [], []
    if soak.proxy_died:
        reasons.append("the proxy process died during the run")
    answered = soak.totals["requests"]
    lost = soak.totals["no_answer"]
    if lost > 0.005 * max(1, answered + lost):
        reasons.append(f"{lost} of {answered + lost} requests got no HTTP answer")
    ws = soak.ws
    if ws["bad_echo"]:
        reasons.append(f"{ws['bad_echo']} websocket messages came back different")
    if ws["errors"] + ws["refused"] > 0.005 * max(1, ws["opened"] + ws["errors"] + ws["refused"]):
        reasons.append(
            f"{ws['refused']} websockets refused and {ws['errors']} broken, "
            f"of {ws['opened']} opened"
        )
    if soak.api_errors:
        notes.append(f"{soak.api_errors} of {soak.api_calls} route API calls failed")
    routes = [s["routes"] for s in samples if s["routes"] >= 0]
    if routes and (min(routes) < a.routes or max(routes) > a.routes + 1):
        notes.append(
            f"hubgate_routes ranged {min(routes)}-{max(routes)} "
            f"(want {a.routes} + the websocket route)"
        )
    if len(samples) < 4:
        reasons.append(f"only {len(samples)} samples: too short to judge a trend")
        return reasons, notes, {}
    fd2, fd4 = quarter_means(samples, "fds")
    rss2, rss4 = quarter_means(samples, "rss_kb")
    th2, th4 = quarter_means(samples, "threads")
    fd_limit = fd2 + max(fd2 * a.fd_tolerance, a.fd_floor)
    rss_limit = rss2 + max(rss2 * a.rss_tolerance, a.rss_floor_kb)
    figures = {
        "fds_q2": fd2,
        "fds_q4": fd4,
        "fds_limit": fd_limit,
        "rss_q2": rss2,
        "rss_q4": rss4,
        "rss_limit": rss_limit,
        "threads_q2": th2,
        "threads_q4": th4,
        # Over everything after the first (warm-up) quarter.
        "fds_slope": slope_per_minute(samples[len(samples) // 4 :], "fds"),
        "rss_slope": slope_per_minute(samples[len(samples) // 4 :], "rss_kb"),
    }
    if fd4 > fd_limit:
        reasons.append(
            f"open descriptors grew: last quarter {fd4:.0f} vs second quarter {fd2:.0f} "
            f"(limit {fd_limit:.0f})"
        )
    if rss4 > rss_limit:
        reasons.append(
            f"RSS grew: last quarter {rss4:.0f} KiB vs second quarter {rss2:.0f} KiB "
            f"(limit {rss_limit:.0f} KiB)"
        )
    if th4 > th2 + 4:
        notes.append(f"threads grew: {th2:.1f} -> {th4:.1f}")
    return reasons, notes, figures


def machine():
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = f"{models[0] if models else '?'} x {os.cpu_count() or 0}"
    except OSError:
        info["cpu"] = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = next(line for line in f if line.startswith("MemTotal:"))
        info["memory"] = "%.1f GiB" % (int(mem.split()[1]) / 1048576)
    except (OSError, StopIteration):
        info["memory"] = "?"
    u = platform.uname()
    info["kernel"] = f"{u.system} {u.release} {u.machine}"
    info["python"] = platform.python_version()
    return info


LOG_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\S+\s+")
LOG_NUMBER = re.compile(r"\b\d+(\.\d+)?(ms|s|µs)?\b")


def proxy_log_summary(path):
    """WARN and ERROR line counts, and the distinct messages (timestamps and numbers masked)
    with how often each occurred."""
    counts = {"WARN": 0, "ERROR": 0}
    messages = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                for level in counts:
                    if f" {level} " in line or f'"level":"{level}"' in line:
                        counts[level] += 1
                        shape = LOG_NUMBER.sub("N", LOG_STAMP.sub("", line.strip()))[:200]
                        messages[shape] = messages.get(shape, 0) + 1
    except OSError:
        pass
    top = sorted(messages.items(), key=lambda kv: -kv[1])[:10]
    return counts, [f"{n:7d} × {m}" for m, n in top]


COLUMNS = [
    ("t", "t (s)"),
    ("fds", "FDs"),
    ("clients", "client conns"),
    ("upstream", "upstream conns"),
    ("ws_upstream", "ws upstream"),
    ("rss_kb", "RSS (KiB)"),
    ("threads", "threads"),
    ("routes", "routes"),
    ("ws_open", "ws open"),
    ("backends_up", "backends up"),
    ("requests", "requests"),
    ("ok", "200"),
    ("s503", "503"),
    ("s404", "404"),
    ("other", "other"),
    ("no_answer", "no answer"),
    ("p50_ms", "client p50 ms"),
    ("p99_ms", "client p99 ms"),
    ("hub_p99_ms", "hubgate p99 ≤ ms"),
]


def table(samples):
    out = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in samples:
        out.append("| " + " | ".join("" if s[k] is None else str(s[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(out)


def report(soak, reasons, notes, figures, logsum, wall):
    a = soak.a
    m = machine()
    ws = soak.ws
    verdict_line = "FAIL" if reasons else "PASS"
    lines = [
        f"# hubgate soak: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"`bash benches/load/soak.sh --minutes {a.minutes:g}` — verdict: **{verdict_line}**",
        "",
    ]
    lines += ["- " + r for r in reasons] + ["- note: " + n for n in notes]
    lines += [
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}; memory: {m['memory']}; {m['kernel']}; Python {m['python']}",
        f"- hubgate: {a.revision} (release build), pid {a.pid}, `--log-level warn`",
        f"- load average before: {a.loadavg_before}; after: {read_loadavg()}",
        "- everything on 127.0.0.1, sharing all cores; the load generator is one Python process",
        "",
        "## Load",
        "",
        f"- {a.routes} routes `/soak/r<n>` over {a.backends} backends, plus `/soak/ws` to a "
        "websocket echo backend (examples/wsload echo)",
        f"- churn: every {a.churn_every:g} s {a.churn_routes} routes deleted and {a.churn_routes} "
        f"added ({soak.churned} replaced in all; {soak.api_calls} API calls, "
        f"{soak.api_errors} failed)",
        f"- backends: every {a.flap_every:g} s the {a.flap_backends} stopped last time start "
        f"again and {a.flap_backends} others stop ({soak.flaps} stops in all, "
        f"{soak.restart_failures} restarts failed)",
        f"- HTTP: at most {a.rate:g} req/s over {a.concurrency} keep-alive connections "
        f"(85 % GET, 10 % POST 1-16 KiB, 5 % GET 64 KiB); {soak.totals['requests']} answered "
        f"{json.dumps(dict(sorted(soak.totals['by_status'].items())))}; "
        f"{soak.totals['no_answer']} without an answer "
        f"{json.dumps(soak.totals['no_answer_kinds'])}",
        f"- websockets: {a.websockets} open at a time, each for 2-15 s with a message and its "
        "echo about every second, 4 in 5 closed with a close handshake and the rest dropped: "
        f"{ws['opened']} opened, {ws['closed']} closed, {ws['dropped']} dropped, "
        f"{ws['refused']} refused, {ws['errors']} broken; {ws['messages']} messages "
        f"({ws['bad_echo']} echoed wrong), "
        f"round trip p50 {ms(percentile(soak.ws_rtts, 0.5))} ms, "
        f"p99 {ms(percentile(soak.ws_rtts, 0.99))} ms",
        f"- proxy log: {logsum[0]['WARN']} WARN, {logsum[0]['ERROR']} ERROR lines",
        f"- wall time of the load process (setup and wind-down included): {wall:.0f} s; "
        f"one sample every {a.sample_every:g} s",
        "",
    ]
    if logsum[1]:
        lines += (
            ["Distinct WARN/ERROR messages (numbers masked):", "", "```"] + logsum[1] + ["```", ""]
        )
    if figures:
        lines += [
            "## Trend (second quarter → last quarter of the samples)",
            "",
            "| | second quarter | last quarter | limit |",
            "|---|---|---|---|",
            "| FDs | {fds_q2:.0f} | {fds_q4:.0f} | {fds_limit:.0f} ".format_map(figures)
            + f"(+{round(a.fd_tolerance * 100)} % or +{a.fd_floor}) |",
            "| RSS (KiB) | {rss_q2:.0f} | {rss_q4:.0f} | {rss_limit:.0f} ".format_map(figures)
            + f"(+{round(a.rss_tolerance * 100)} % or +{a.rss_floor_kb} KiB) |",
            "| threads | {threads_q2:.1f} | {threads_q4:.1f} | |".format_map(figures),
            "",
            "Least-squares slope after the first quarter (informational, not judged): "
            "{fds_slope:+.2f} FDs/min, {rss_slope:+.0f} KiB/min.".format_map(figures),
            "",
        ]
    lines += [
        "## Samples",
        "",
        f"Every {a.sample_every:g} s. FDs: `/proc/<pid>/fd`; client conns: hubgate's sockets "
        "on its own ports (public, API, metrics); upstream conns: to the HTTP backends; "
        "ws upstream: to the "
        "websocket echo backend (all from `/proc/net/tcp`). `hubgate p99 ≤` is the upper bound "
        "of the `hubgate_request_duration_seconds` bucket holding the interval's 99th "
        "percentile (all route kinds, websocket handshakes included); the client columns are "
        "measured by the load generator and include its own scheduling delays.",
        "",
        table(soak.samples),
        "",
    ]
    return "\n".join(lines)


def read_loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--proxy-port", type=int, required=True)
    p.add_argument("--api-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--ws-port", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--minutes", type=float, default=3)
    p.add_argument("--routes", type=int, default=1000)
    p.add_argument("--backends", type=int, default=40)
    p.add_argument("--backend-base", type=int, default=25000)
    p.add_argument("--rate", type=float, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--websockets", type=int, default=100)
    p.add_argument("--churn-every", type=float, default=3)
    p.add_argument("--churn-routes", type=int, default=50)
    p.add_argument("--flap-every", type=float, default=5)
    p.add_argument("--flap-backends", type=int, default=4)
    p.add_argument("--sample-every", type=float, default=5)
    p.add_argument("--fd-tolerance", type=float, default=0.10)
    p.add_argument("--fd-floor", type=int, default=16)
    p.add_argument("--rss-tolerance", type=float, default=0.15)
    p.add_argument("--rss-floor-kb", type=int, default=4096)
    p.add_argument("--ready-file", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--proxy-log", default="")
    p.add_argument("--revision", default="?")
    p.add_argument("--loadavg-before", default="?")
    a = p.parse_args()
    a.seconds = a.minutes * 60
    # Stopped by soak.sh on interrupt: no report, no traceback; the kernel closes the sockets.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))

    soak = Soak(a)
    t = time.monotonic()
    asyncio.run(soak.run())
    wall = time.monotonic() - t

    reasons, notes, figures = verdict(soak)
    logsum = proxy_log_summary(a.proxy_log)
    text = report(soak, reasons, notes, figures, logsum, wall)
    os.makedirs(os.path.dirname(os.path.abspath(a.report)), exist_ok=True)
    with open(a.report, "w") as f:
        f.write(text)

    s = soak.samples
    keys = (
        "t",
        "fds",
        "clients",
        "upstream",
        "ws_upstream",
        "rss_kb",
        "threads",
        "routes",
        "ws_open",
        "requests",
        "p99_ms",
        "hub_p99_ms",
    )
    if s:
        print("first sample: " + " ".join(f"{k}={s[0][k]}" for k in keys))
        print("last sample:  " + " ".join(f"{k}={s[-1][k]}" for k in keys))
    if figures:
        print(
            "FDs {fds_q2:.0f} -> {fds_q4:.0f} (limit {fds_limit:.0f}); "
            "RSS {rss_q2:.0f} -> {rss_q4:.0f} KiB (limit {rss_limit:.0f}); "
            "threads {threads_q2:.1f} -> {threads_q4:.1f}  [second quarter -> last quarter]; "
            "slope once warm {fds_slope:+.2f} FDs/min, {rss_slope:+.0f} KiB/min".format_map(figures)
        )
    ws = soak.ws
    print(
        f"requests: {soak.totals['requests']} answered "
        f"{json.dumps(dict(sorted(soak.totals['by_status'].items())))}, "
        f"{soak.totals['no_answer']} without answer; websockets: {ws['opened']} opened, "
        f"{ws['refused']} refused, {ws['errors']} broken, {ws['messages']} messages"
    )
    for n in notes:
        print("note: " + n)
    print("report: " + a.report)
    if reasons:
        for r in reasons:
            print("FAIL: " + r)
        sys.exit(1)
    print("PASS: descriptors and RSS flat once warm")


if __name__ == "__main__":
    main()
