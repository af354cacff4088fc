"""How long a real JupyterHub takes to put 2 000 missing routes into hubgate, by proxy class.

One run, two rows, the same hubgate binary (the one installed with jupyterhub-hubgate):
- JupyterHub's ConfigurableHTTPProxy with `command = [hubgate]`: one `POST /api/routes` per
  missing route (10 at a time);
- HubgateProxy (`proxy_class = "hubgate"`): one `PATCH /api/proxy` batch.

Each row starts a hub whose database holds 2 000 users with running servers (all one shared
backend, tests/python/hubtest.py) and a new, empty hubgate, so the hub's start-up reconcile finds
every route missing. Reported: the hub's own `check_routes` duration (its
`jupyterhub_check_routes_duration_seconds`), the time from the start of that reconcile (the
hub's "Checking routes" log line) until the table, polled every 50 ms, holds every route, and
the route API calls hubgate counted. Then the size of the release wheel, built here.

Run with the Python of a venv where the wheel and JupyterHub are installed (.ci/python.sh makes
one under target/python/venv):

    target/python/venv/bin/python benches/jupyterhub_reconcile.py [--users N] [--no-wheel]
"""

import argparse
import asyncio
import glob
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

from hubtest import (  # noqa: E402
    ADMIN_TOKEN,
    Hub,
    add_running_servers,
    free_ports,
    metric,
    start_backend,
)
from jupyterhub_hubgate import find_hubgate_bin  # noqa: E402

PROXY_TOKEN = "bench-proxy-token-0123456789abcdef"


async def run_row(label, users, extra_env, token):
    with tempfile.TemporaryDirectory(prefix="hubgate-reconcile-") as tmp:
        (backend_port,) = free_ports(1)
        backend = start_backend(tmp, backend_port)
        names = [f"user{i:05}" for i in range(users)]
        add_running_servers(os.path.join(tmp, "hub"), names, backend_port)
        hub = Hub(
            os.path.join(tmp, "hub"),
            env={
                "HUBGATE_PY_SPAWNER": "shared",
                "HUBGATE_PY_BACKEND_PORT": str(backend_port),
                "HUBGATE_PY_KEEP_RUNNING": "1",
                **extra_env,
            },
        )
        try:
            hub.start()
            async with aiohttp.ClientSession() as session:
                complete_at = await wait_complete(hub, session, users, token)
                check = await hub_histogram(hub, session, "jupyterhub_check_routes_duration")
                samples = await hub.hubgate_metrics(session, token=token or hub.proxy_token())
            started = reconcile_started(hub.log_text())
            ops = "hubgate_api_operations_total"
            calls = {op: int(metric(samples, ops, op=op)) for op in ("route_add", "batch", "sync")}
            return {
                "label": label,
                "check_routes": check,
                "to_complete": complete_at - started,
                "calls": calls,
            }
        finally:
            hub.close()
            backend.kill()
            backend.wait()


async def wait_complete(hub, session, users, token):
    """The wall-clock time at which hubgate's table first holds every user's route."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if hub.exited():
            raise SystemExit(f"the hub exited:\n{hub.log_tail()}")
        try:
            routes = await hub.proxy_routes(session, token=token or hub.proxy_token())
        except (aiohttp.ClientError, OSError, AssertionError):
            routes = {}
        if sum(1 for r in routes.values() if "user" in r) >= users:
            return time.time()
        await asyncio.sleep(0.05)
    raise SystemExit(f"the table was not complete after 600 s:\n{hub.log_tail()}")


def reconcile_started(log):
    """When the hub began its first route check, from its log line's timestamp."""
    for line in log.splitlines():
        if "Checking routes" in line and line.startswith("["):
            stamp = " ".join(line.split()[1:3])
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
    raise SystemExit("the hub never logged 'Checking routes'")


async def hub_histogram(hub, session, name):
    """(sum, count) of one of the hub's own Prometheus histograms."""
    headers = {"Authorization": f"token {ADMIN_TOKEN}"}
    url = hub.hub_api.rsplit("/api", 1)[0] + "/metrics"
    async with session.get(url, headers=headers) as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        for part in ("_sum", "_count"):
            if line.startswith(name + "_seconds" + part):
                values[part] = float(line.rsplit(" ", 1)[1])
    return values.get("_sum", float("nan")), int(values.get("_count", 0))


def release_wheel():
    out = os.path.join(ROOT, "target", "python", "release-wheels")
    subprocess.run(
        [os.path.join(ROOT, "target/python/tools/bin/maturin"), "build", "--release", "--quiet"]
        + ["--out", out],
        cwd=ROOT,
        check=True,
    )
    return sorted(glob.glob(os.path.join(out, "jupyterhub_hubgate-*.whl")), key=os.path.getmtime)[
        -1
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--no-wheel", action="store_true", help="skip the release wheel")
    args = parser.parse_args()

    import jupyterhub

    rows = [
        asyncio.run(
            run_row(
                "ConfigurableHTTPProxy + hubgate",
                args.users,
                {
                    "HUBGATE_PY_PROXY_CLASS": "configurable-http-proxy",
                    "HUBGATE_PY_PROXY_COMMAND": find_hubgate_bin(),
                    "HUBGATE_PY_PROXY_TOKEN": PROXY_TOKEN,
                },
                PROXY_TOKEN,
            )
        ),
        asyncio.run(run_row("HubgateProxy", args.users, {}, None)),
    ]
    print(
        f"\n{args.users} users' routes missing at hub start (JupyterHub {jupyterhub.__version__})"
    )
    print(f"{'proxy class':34} {'check_routes':>13} {'until complete':>15}  hubgate API calls")
    for r in rows:
        total, count = r["check_routes"]
        calls = ", ".join(f"{n} {op}" for op, n in r["calls"].items() if n)
        print(
            f"{r['label']:34} {total:11.2f} s {r['to_complete']:13.2f} s  {calls}"
            + (f"  ({count} checks)" if count != 1 else "")
        )
    if not args.no_wheel:
        wheel = release_wheel()
        print(f"\nrelease wheel {os.path.basename(wheel)}: {os.path.getsize(wheel) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
