"""Fuzz hubgate's API against its OpenAPI document with schemathesis, then check what is left.

Run by `.ci/schemathesis.sh` (which makes the venv and builds hubgate); by hand:

    python3 tests/schemathesis/run.py --hubgate target/debug/hubgate \
        --schemathesis target/schemathesis-venv/bin/schemathesis

What it does, all on 127.0.0.1 ports the kernel picks:
1. starts hubgate with a token, the file store in a fresh directory and a metrics listener;
2. runs schemathesis over every operation of docs/openapi.json on the API port (examples,
   coverage, fuzzing and the stateful phase that follows the document's links), then over the
   three operations the metrics listener answers;
3. checks the table is consistent: `GET /api/proxy` parses, every key is canonical, the listing
   and `GET /api/routes/{path}` agree, and every route routes: the table's targets are pointed
   at a loopback echo server by one sync (schemathesis makes up targets anywhere, and nothing
   may be sent anywhere but loopback), then a request for each key through the proxy port must
   reach that route's target;
4. stops hubgate (it must exit 0, without a panic), starts it again on the same store and checks
   the table came back exactly.

Exits non-zero on any failure, and prints the figures (operations, cases, time) at the end.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "openapi.json"
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
STARTUP_TIMEOUT = 30.0


class Hubgate:
    """A hubgate process on loopback ports of its own, with its stderr in a file."""

    def __init__(self, binary: Path, store: Path, token: str, log: Path) -> None:
        self.log_path = log
        self.token = token
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HUBGATE_", "JUPYTERHUB_", "CONFIGPROXY_")) and k != "RUST_LOG"
        }
        env["CONFIGPROXY_AUTH_TOKEN"] = token
        args = [
            str(binary),
            "--ip", "127.0.0.1", "--port", "0",
            "--api-ip", "127.0.0.1", "--api-port", "0",
            "--metrics-ip", "127.0.0.1", "--metrics-port", "0",
            "--storage-backend", "file", "--storage-path", str(store),
        ]  # fmt: skip
        # The child keeps its own copy of the descriptor.
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.proxy = self._listening("proxy")
        self.api = self._listening("api")
        self.metrics = self._listening("metrics")

    def _listening(self, which: str) -> str:
        pattern = re.compile(rf'listener="?{which}"?\s.*?addr="?([0-9.]+:[0-9]+)')
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "listening" in line and (m := pattern.search(line)):
                    return m.group(1)
            if self.process.poll() is not None:
                raise SystemExit(f"hubgate exited early:\n{self.logs()}")
            time.sleep(0.05)
        raise SystemExit(f"hubgate did not log listener {which}:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def request(self, method: str, path: str, body: object = None) -> tuple[int, dict, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.api}{path}", data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers every request with the path it received, as the route's target saw it."""

    def _answer(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer

    def log_message(self, *args: object) -> None:
        pass


def schemathesis(
    binary: Path, base: str, token: str, report: Path, work: Path, extra: list[str]
) -> dict:
    """Runs schemathesis; returns its figures (from its JSON report) or exits on failure."""
    args = [
        str(binary),
        "--config-file", str(CONFIG),
        "run", str(DOCUMENT),
        "--url", base,
        "--header", f"Authorization: token {token}",
        "--report", "json",
        "--report-json-path", str(report),
        "--no-color",
        *extra,
    ]  # fmt: skip
    started = time.monotonic()
    print(
        "$",
        " ".join(a if token not in a else "<token header>" for a in args),
        flush=True,
    )
    # In the work directory: schemathesis keeps its cache of past failures (replayed first the
    # next time) in `.schemathesis/` under the directory it runs in.
    code = subprocess.call(args, cwd=work)
    elapsed = time.monotonic() - started
    figures = summarise(report)
    figures["seconds"] = round(elapsed, 1)
    if code != 0:
        raise SystemExit(f"schemathesis found problems (exit {code}): {figures}")
    return figures


def summarise(report: Path) -> dict:
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return {}
    return {k: data[k] for k in ("operations", "test_cases", "failures", "phases") if k in data}


def quote_key(key: str) -> str:
    """A request path that hubgate looks up as `key`.

    Each segment is percent-encoded. A key with a `.` or `..` segment (the API takes any) is
    reached only with its slashes encoded too: hubgate resolves dot segments in a request's
    path before it decodes it, as browsers do, and `%2F` is no separator there.
    """
    segments = key.split("/")
    if any(seg in (".", "..") for seg in segments):
        return "/" + urllib.parse.quote(key[1:], safe="")
    return "/".join(urllib.parse.quote(seg, safe="") for seg in segments)


def check_table(hg: Hubgate, echo_port: int) -> dict:
    """The table after the fuzzing is one a client can read back and the proxy can route."""
    status, headers, body = hg.request("GET", "/api/proxy")
    assert status == 200, (status, body)
    table = json.loads(body)
    assert isinstance(table, dict), table
    version = int(headers["x-hubgate-version"])
    for key, route in table.items():
        assert key.startswith("/") and (key == "/" or not key.endswith("/")), key
        assert isinstance(route, dict) and isinstance(route.get("target"), str), (
            key,
            route,
        )
        # The whole key as one encoded segment: `/api/routes/` alone would list the table.
        status, _, one = hg.request("GET", "/api/routes/" + urllib.parse.quote(key, safe=""))
        assert status == 200, f"{key!r} is listed but GET /api/routes/... answers {status}"
        assert json.loads(one)["target"] == route["target"], key

    # One sync points every route at the echo server, each at a path of its own, keeping keys
    # and data: it must change exactly the routes whose target differs and keep every key.
    # A body's keys are paths as in a URL, percent-decoded; a listing's are decoded already, so
    # a literal `%` goes back as `%25` (as the document says).
    desired = {}
    for i, (key, route) in enumerate(table.items()):
        data = {k: v for k, v in route.items() if k != "last_activity"}
        data["target"] = f"http://127.0.0.1:{echo_port}/route-{i}"
        desired[key.replace("%", "%25")] = data
    status, _, body = hg.request("POST", "/api/proxy", desired)
    assert status == 200, (status, body)
    summary = json.loads(body)
    assert summary["added"] == 0 and summary["removed"] == 0, summary
    assert summary["updated"] == len(table), summary
    assert summary["version"] == version + (1 if table else 0), (summary, version)

    routed = 0
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for i, key in enumerate(table):
        url = f"http://{hg.proxy}{quote_key(key)}"
        try:
            with opener.open(url, timeout=30) as resp:
                seen = json.loads(resp.read())["path"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"route {key!r}: {url} answered {e.code}") from None
        want = f"/route-{i}"
        assert seen.startswith(want) and seen[len(want) :] in ("", quote_key(key)), (
            key,
            seen,
        )
        routed += 1
    return {"routes": len(table), "routed": routed, "version": version}


def without_activity(table: dict) -> dict:
    return {k: {f: v for f, v in r.items() if f != "last_activity"} for k, r in table.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hubgate", type=Path, required=True)
    parser.add_argument("--schemathesis", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=ROOT / "target" / "schemathesis")
    parser.add_argument("--max-examples", default="40")
    parser.add_argument("--max-time", default="120")
    parser.add_argument("--seed", default=None)
    opts = parser.parse_args()
    # schemathesis runs in the work directory; every path it is given must not depend on that.
    for name in ("hubgate", "schemathesis", "work"):
        setattr(opts, name, getattr(opts, name).resolve())

    started = time.monotonic()
    opts.work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=opts.work))
    store = run_dir / "store"
    token = secrets.token_hex(16)

    echo = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()

    hg = Hubgate(opts.hubgate, store, token, run_dir / "hubgate.log")
    print(f"hubgate: proxy {hg.proxy}, api {hg.api}, metrics {hg.metrics}; logs in {run_dir}")
    seed = ["--seed", opts.seed] if opts.seed else []
    try:
        api = schemathesis(
            opts.schemathesis,
            f"http://{hg.api}",
            token,
            run_dir / "api.json",
            opts.work,
            [
                "--phases", "examples,coverage,fuzzing,stateful",
                "--max-examples", opts.max_examples,
                "--max-time", opts.max_time,
                "--workers", "1",
                *seed,
            ],
        )  # fmt: skip
        # The metrics listener answers the health operations and /metrics without a token.
        metrics = schemathesis(
            opts.schemathesis,
            f"http://{hg.metrics}",
            token,
            run_dir / "metrics.json",
            opts.work,
            [
                "--include-path-regex", "^/(metrics|health/)",
                "--exclude-checks", "ignored_auth",
                "--phases", "examples,coverage,fuzzing",
                "--max-examples", "20",
                *seed,
            ],
        )  # fmt: skip
        table = check_table(hg, echo.server_address[1])
        status, _, before = hg.request("GET", "/api/proxy")
        assert status == 200
    except BaseException:
        hg.stop()
        raise
    code = hg.stop()
    logs = hg.logs()
    assert code == 0, f"hubgate exited with {code}"
    assert "panicked" not in logs, "hubgate panicked; see " + str(hg.log_path)

    # `last_activity` is saved every 5 s (it is advisory), so the routes' data is compared.
    again = Hubgate(opts.hubgate, store, token, run_dir / "hubgate-restart.log")
    try:
        status, _, after = again.request("GET", "/api/proxy")
        assert status == 200, (status, after)
        lost = without_activity(json.loads(before)) != without_activity(json.loads(after))
        assert not lost, f"the table did not come back whole after a restart:\n{before}\n{after}"
    finally:
        again.stop()
    echo.shutdown()
    shutil.rmtree(store, ignore_errors=True)

    total = round(time.monotonic() - started, 1)
    print(
        json.dumps(
            {
                "api_port": api,
                "metrics_port": metrics,
                "table": table,
                "total_seconds": total,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
