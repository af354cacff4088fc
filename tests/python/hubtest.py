"""What tests/python and benches/jupyterhub_reconcile.py share: a real hub, and its parts.

- `Hub`: `jupyterhub -f tests/python/jupyterhub_config.py` in a working directory of its own
  (which is also the hub's, and so hubgate's, data directory), with loopback ports picked here;
  stopped on `close()` together with everything it left running (hubgate, users' servers).
- `SharedBackendSpawner`: the spawner of hubs with many users: every server is one shared
  backend, so a thousand "running" servers cost no process each.
- `add_running_servers`: writes users with running servers into a hub's database before the hub
  starts, so that the hub starts with their routes missing from the proxy.
- `eventually`: bounded polling across processes.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
from jupyterhub.spawner import Spawner

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_URL = "/@/space%20word/"
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
#: How long any one step across processes may take.
PATIENCE = 60


class SharedBackendSpawner(Spawner):
    """Every server is the backend at HUBGATE_PY_BACKEND_PORT; running while it has a server."""

    async def start(self):
        return ("127.0.0.1", int(os.environ["HUBGATE_PY_BACKEND_PORT"]))

    async def poll(self):
        return None if self.server else 0

    async def stop(self, now=False):
        pass


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def add_running_servers(workdir, names, port):
    """Users `names`, each with a server at 127.0.0.1:`port`, in the hub's (new) database."""
    from jupyterhub import orm

    os.makedirs(workdir, exist_ok=True)
    db = "sqlite:///" + os.path.join(str(workdir), "jupyterhub.sqlite")
    session = orm.new_session_factory(db)()
    for name in names:
        user = orm.User(name=name)
        session.add(user)
        spawner = orm.Spawner(user=user, name="")
        spawner.server = orm.Server(ip="127.0.0.1", port=port, base_url=f"{BASE_URL}user/{name}/")
        session.add(spawner)
    session.commit()
    session.close()


async def eventually(what, check, patience=PATIENCE, hub=None):
    """Polls `check()` (async, raising AssertionError until it holds) for `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return await check()
        except (AssertionError, aiohttp.ClientError, OSError) as e:
            if hub is not None and hub.exited():
                raise AssertionError(f"{what}: the hub exited\n{hub.log_tail()}") from e
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still not after {patience} s: {e}") from e
        await asyncio.sleep(0.2)


class Hub:
    """A real JupyterHub using the configuration in this directory."""

    def __init__(self, workdir, env=None):
        self.workdir = str(workdir)
        public, api, hub = free_ports(3)
        self.public_port, self.api_port, self.hub_port = public, api, hub
        self.env = {
            "HUBGATE_PY_WORKDIR": self.workdir,
            "HUBGATE_PY_PUBLIC_PORT": str(public),
            "HUBGATE_PY_API_PORT": str(api),
            "HUBGATE_PY_HUB_PORT": str(hub),
            "HUBGATE_PY_ADMIN_TOKEN": ADMIN_TOKEN,
            **(env or {}),
        }
        self.process = None
        self.log_path = os.path.join(self.workdir, "jupyterhub.log")
        self.public = f"http://127.0.0.1:{public}"
        self.api = f"http://127.0.0.1:{api}"
        self.hub_api = f"http://127.0.0.1:{hub}{BASE_URL}hub/api"

    def start(self):
        os.makedirs(self.workdir, exist_ok=True)
        env = {**os.environ, **self.env}
        for name in ("CONFIGPROXY_AUTH_TOKEN", "JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL"):
            env.pop(name, None)
        jupyterhub = os.path.join(os.path.dirname(sys.executable), "jupyterhub")
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [jupyterhub, "-f", os.path.join(HERE, "jupyterhub_config.py")],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def exited(self):
        return self.process is not None and self.process.poll() is not None

    def stop(self):
        """SIGTERM, as an administrator stops the hub; waits for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self):
        """Stops the hub and anything it left running."""
        self.stop()
        # hubgate.pid is HubgateProxy's; jupyterhub-proxy.pid ConfigurableHTTPProxy's.
        pidfiles = [os.path.join(self.workdir, n) for n in ("hubgate.pid", "jupyterhub-proxy.pid")]
        pids_dir = os.path.join(self.workdir, "pids")
        if os.path.isdir(pids_dir):
            pidfiles += [os.path.join(pids_dir, n) for n in os.listdir(pids_dir)]
        for path in pidfiles:
            try:
                with open(path) as f:
                    os.kill(int(f.read().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def log_tail(self, lines=200):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def hubgate_pid(self):
        with open(os.path.join(self.workdir, "hubgate.pid")) as f:
            return int(f.read().strip())

    def proxy_token(self):
        """The API token HubgateProxy keeps in the data directory (the hub's workdir)."""
        with open(os.path.join(self.workdir, "hubgate-secrets.json")) as f:
            return json.load(f)["proxy_token"]

    # ----- talking to the hub and to hubgate --------------------------------------------------

    async def hub_request(self, session, method, path, **kwargs):
        headers = {"Authorization": f"token {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
        async with session.request(method, self.hub_api + path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            assert resp.status < 300, f"{method} {path}: {resp.status} {text}"
            return json.loads(text) if text else None

    async def wait_up(self, session, patience=PATIENCE):
        async def up():
            await self.hub_request(session, "GET", "/")

        await eventually("the hub answers its API", up, patience=patience, hub=self)

    async def proxy_routes(self, session, token=None):
        headers = {"Authorization": f"token {token or self.proxy_token()}"}
        async with session.get(self.api + "/api/routes", headers=headers) as resp:
            assert resp.status == 200, f"GET /api/routes: {resp.status}"
            return await resp.json()

    async def hubgate_metrics(self, session, token=None):
        """hubgate's Prometheus samples: {(name, frozenset(labels)): value}."""
        headers = {"Authorization": f"token {token or self.proxy_token()}"}
        async with session.get(self.api + "/metrics", headers=headers) as resp:
            assert resp.status == 200, f"GET /metrics: {resp.status}"
            text = await resp.text()
        samples = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            pairs = frozenset(
                tuple(p.split("=", 1)) for p in labels.rstrip("}").replace('"', "").split(",") if p
            )
            samples[(name, pairs)] = float(value)
        return samples

    async def user_token(self, session, user):
        if not await self._user_exists(session, user):
            await self.hub_request(session, "POST", "/users", json={"usernames": [user]})
        body = await self.hub_request(
            session, "POST", f"/users/{user}/tokens", json={"note": "test"}
        )
        return body["token"]

    async def _user_exists(self, session, user):
        async with session.get(
            f"{self.hub_api}/users/{user}", headers={"Authorization": f"token {ADMIN_TOKEN}"}
        ) as resp:
            return resp.status == 200

    async def start_server(self, session, user):
        if not await self._user_exists(session, user):
            await self.hub_request(session, "POST", "/users", json={"usernames": [user]})
        await self.hub_request(session, "POST", f"/users/{user}/server")

        async def ready():
            body = await self.hub_request(session, "GET", f"/users/{user}")
            assert body["servers"].get("", {}).get("ready"), f"{user}'s server is not ready"

        await eventually(f"{user}'s server is ready", ready, hub=self)


def metric(samples, name, **labels):
    """The value of one series (0 when absent)."""
    want = frozenset(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


BACKEND = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    # The hub checks a thousand servers at once at start; the default backlog of 5 would
    # make most of those connections wait for SYN retries.
    request_queue_size = 4096
    daemon_threads = True

Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def start_backend(workdir, port):
    """The shared backend of SharedBackendSpawner's servers: 200 to every GET."""
    return subprocess.Popen(
        [sys.executable, "-c", BACKEND, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def drop_user_routes(hub, session, token=None):
    """Makes hubgate's table hold only its non-user routes (one `POST /api/proxy` sync), so
    that the hub's next reconcile finds every user's route missing."""
    routes = await hub.proxy_routes(session, token=token)
    keep = {k: r for k, r in routes.items() if "user" not in r}
    headers = {"Authorization": f"token {token or hub.proxy_token()}"}
    async with session.post(hub.api + "/api/proxy", json=keep, headers=headers) as resp:
        assert resp.status == 200, f"sync: {resp.status} {await resp.text()}"
    return len(routes) - len(keep)


async def reconcile_now(hub, session):
    """`POST /hub/api/proxy`: the hub runs `check_routes` and answers when it has finished."""
    await hub.hub_request(session, "POST", "/proxy")


def user_route_count(routes):
    return sum(1 for r in routes.values() if "user" in r)
