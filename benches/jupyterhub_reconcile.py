"""How long a real JupyterHub takes to put 2 000 missing routes into hubgate, by proxy class.

One run, two rows, the same hubgate binary (the one installed with jupyterhub-hubgate):
- JupyterHub's ConfigurableHTTPProxy with `command = [hubgate]`: one `POST /api/routes` per
  missing route (10 at a time);
- HubgateProxy (`proxy_class = "hubgate"`): one `PATCH /api/proxy` batch.

Each row starts a hub whose database holds 2 000 users with running servers (all one shared
backend, tests/python/hubtest.py) and waits until hubgate routes them all. Then it empties
hubgate's table of user routes (one `POST /api/proxy` sync) and asks the hub to reconcile now
(`POST /hub/api/proxy`, answered once the hub's `check_routes` has finished): the time from that
request until hubgate's table holds every route again is the row's figure, with the route API
calls hubgate counted meanwhile. Then the size of the release wheel, built here.

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

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

from hubtest import (  # noqa: E402
    Hub,
    add_running_servers,
    drop_user_routes,
    free_ports,
    metric,
    reconcile_now,
    start_backend,
    user_route_count,
)
from jupyterhub_hubgate import find_hubgate_bin  # noqa: E402

PROXY_TOKEN = "bench-proxy-token-0123456789abcdef"


async def run_row(label, users, extra_env, token):
    with tempfile.TemporaryDirectory(prefix="hubgate-reconcile-") as tmp:
        (backend_port,) = free_ports(1)
        names = [f"user{i:05}" for i in range(users)]
        add_running_servers(os.path.join(tmp, "hub"), names, backend_port)
        backend = start_backend(tmp, backend_port)
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
                await hub.wait_up(session, patience=300)
                await wait_complete(hub, session, users, token)
                assert await drop_user_routes(hub, session, token=token) == users
                before = await hub.hubgate_metrics(session, token=token)
                started = time.perf_counter()
                await reconcile_now(hub, session)
                answered = time.perf_counter() - started
                await wait_complete(hub, session, users, token)
                complete = time.perf_counter() - started
                after = await hub.hubgate_metrics(session, token=token)
            ops = "hubgate_api_operations_total"
            calls = {
                op: int(metric(after, ops, op=op) - metric(before, ops, op=op))
                for op in ("route_add", "batch")
            }
            return {"label": label, "answered": answered, "complete": complete, "calls": calls}
        finally:
            hub.close()
            backend.kill()
            backend.wait()


async def wait_complete(hub, session, users, token):
    """Polls (every 20 ms) until hubgate's table holds every user's route."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if hub.exited():
            raise SystemExit(f"the hub exited:\n{hub.log_tail()}")
        try:
            routes = await hub.proxy_routes(session, token=token)
        except (aiohttp.ClientError, OSError, AssertionError):
            routes = {}
        if user_route_count(routes) >= users:
            return
        await asyncio.sleep(0.02)
    raise SystemExit(f"the table was not complete after 600 s:\n{hub.log_tail()}")


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
        f"\n{args.users} users' routes missing, one reconcile (JupyterHub {jupyterhub.__version__})"
    )
    print(f"{'proxy class':34} {'hub answered':>13} {'table complete':>15}  hubgate API calls")
    for r in rows:
        calls = ", ".join(f"{n} {op}" for op, n in r["calls"].items() if n)
        print(f"{r['label']:34} {r['answered']:11.2f} s {r['complete']:13.2f} s  {calls}")
    if not args.no_wheel:
        wheel = release_wheel()
        print(f"\nrelease wheel {os.path.basename(wheel)}: {os.path.getsize(wheel) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
