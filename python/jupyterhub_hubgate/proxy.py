"""HubgateProxy: JupyterHub's proxy class for hubgate.

It starts and supervises the hubgate installed with this package as JupyterHub supervises
configurable-http-proxy (a pid file, a check every `check_running_interval` seconds, a restart
and a restore of every route when it has died, a stop with the hub unless
`JupyterHub.cleanup_proxy` is off), and it differs where hubgate can do better:

- routes live in hubgate's embedded file store in the hub's data directory, so a restarted
  hubgate serves them at once; a hubgate left running by a previous hub (`cleanup_proxy = False`)
  is taken over instead of being killed, so users' connections survive a hub restart;
- the hub's reconcile (`check_routes`, and `restore_routes` after a restart) is one atomic
  `PATCH /api/proxy` batch instead of one API call per route, and the table is read in pages
  (`GET /api/proxy?offset=&limit=`);
- authentication at the edge is on: before the hub reads its services and roles, the class
  registers hubgate as the hub service `hubgate` (an API token with the `proxy` and
  `read:users:groups` scopes, an OAuth client whose callback hubgate answers) and lets users log
  in to it (`access:services!service=hubgate`). The token and the session-cookie secret are
  kept in `hubgate-secrets.json` in the data directory, so they survive hub restarts.
"""

import asyncio
import contextvars
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from subprocess import PIPE, Popen
from urllib.parse import unquote

import jupyterhub
from packaging.version import Version

from jupyterhub_hubgate import find_hubgate_bin

#: The oldest JupyterHub this class is tested with (tests/python run against JupyterHub 6).
MIN_JUPYTERHUB = "6.0"

if Version(jupyterhub.__version__) < Version(MIN_JUPYTERHUB):
    # Checked before importing anything else from JupyterHub: older hubs lack some of it, and
    # the error would then name a module instead of the versions.
    raise ImportError(
        f"jupyterhub-hubgate needs JupyterHub {MIN_JUPYTERHUB} or newer; "
        f"this hub is JupyterHub {jupyterhub.__version__}"
    )

from aiohttp import ClientConnectionError  # noqa: E402
from jupyterhub.httpclient import fetch  # noqa: E402
from jupyterhub.objects import Server  # noqa: E402
from jupyterhub.proxy import ConfigurableHTTPProxy  # noqa: E402
from jupyterhub.utils import exponential_backoff, url_path_join  # noqa: E402
from traitlets import Bool, Integer, List, Unicode, default  # noqa: E402

#: The media type with which hubgate answers pages of its table.
PAGINATION = "application/jupyterhub-pagination+json"
#: The file in the data directory holding the tokens and secrets that must survive restarts.
SECRETS_FILE = "hubgate-secrets.json"

#: Set while `check_routes`/`restore_routes` run: route changes are collected, not sent.
_batch = contextvars.ContextVar("hubgate_batch", default=None)


class HubgateStartError(RuntimeError):
    """hubgate cannot be started; the message names the cause in one line."""


class _Batch:
    """Route changes collected for one `PATCH /api/proxy`."""

    def __init__(self):
        self.add = {}
        self.remove = []

    def __len__(self):
        return len(self.add) + len(self.remove)


class _RunningHubgate:
    """A hubgate this hub did not spawn (a previous hub left it running), watched by pid.

    It has what the base class uses of a `Popen`: `pid`, `poll()` and `terminate()`.
    """

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                # Not our child: its exit status went to whoever reaped it.
                self.returncode = -1
        return self.returncode

    def terminate(self):
        os.kill(self.pid, signal.SIGTERM)

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)


class HubgateProxy(ConfigurableHTTPProxy):
    """JupyterHub's proxy as hubgate: `c.JupyterHub.proxy_class = "hubgate"`."""

    command = List(
        Unicode(),
        config=True,
        help="""The hubgate command. Empty (the default) runs the hubgate installed with this
        package, found beside the Python running the hub, never on PATH. Flags given here come
        before the ones the class adds.""",
    )

    data_dir = Unicode(
        config=True,
        help="""Where hubgate keeps its route store (`hubgate-routes/`) and the secrets it needs
        across restarts (`hubgate-secrets.json`). Defaults to the hub's data directory: the
        directory of `JupyterHub.cookie_secret_file` (the working directory unless set).""",
    )

    @default("data_dir")
    def _default_data_dir(self):
        cookie_file = getattr(self.app, "cookie_secret_file", "") or "jupyterhub_cookie_secret"
        return os.path.dirname(os.path.abspath(cookie_file))

    storage_path = Unicode(
        config=True,
        help="""hubgate's embedded route store (`--storage-path`). Defaults to
        `hubgate-routes` in `data_dir`. Not used with `redis_url`.""",
    )

    @default("storage_path")
    def _default_storage_path(self):
        return os.path.join(self.data_dir, "hubgate-routes")

    redis_url = Unicode(
        "",
        config=True,
        help="""Keep the route table in Redis instead of the file store
        (`--storage-backend redis`), e.g. `redis://127.0.0.1:6379/0`, so that several hubgate
        replicas share it. Passed in the environment (HUBGATE_REDIS_URL), so a password in it
        does not show in the process list.""",
    )

    workers = Integer(
        None,
        allow_none=True,
        config=True,
        help="""hubgate's worker threads (`--workers`). Unset: hubgate's own default.""",
    )

    extra_args = List(
        Unicode(),
        config=True,
        help="""More hubgate flags, after those the class sets, e.g.
        `["--access-log", "--metrics-port", "9100"]`. See `hubgate --help`.""",
    )

    edge_auth = Bool(
        True,
        config=True,
        help="""Authenticate requests to users' servers at the edge: hubgate lets through only
        requests from the server's owner or someone the hub granted access, and logs browsers
        in through the hub's OAuth. The class registers the hub service, OAuth client and user
        scope this needs. False: hubgate forwards like configurable-http-proxy
        (`--auth-mode off`).""",
    )

    service_name = Unicode(
        "hubgate",
        config=True,
        help="""The name under which hubgate is registered as a hub service. If
        `JupyterHub.services` already has a service of this name, the class registers nothing
        and passes no authentication flags: the registration and hubgate's flags
        (`extra_args`) are then the administrator's, as in the README's manual set-up.""",
    )

    oauth_callback_url = Unicode(
        config=True,
        help="""The OAuth callback registered with the hub, which hubgate answers itself.
        Defaults to `<base_url>hubgate/oauth_callback`, a path on the hub's public address.""",
    )

    @default("oauth_callback_url")
    def _default_oauth_callback_url(self):
        return url_path_join(getattr(self.app, "base_url", "/"), "hubgate/oauth_callback")

    page_size = Integer(
        10000,
        config=True,
        help="""Routes per page when the hub reads hubgate's whole table.""",
    )

    stop_timeout = Integer(
        15,
        config=True,
        help="""Seconds hubgate may take to drain after SIGTERM when the hub stops it, before
        it is killed.""",
    )

    pid_file = Unicode(
        config=True,
        help="""File in which to write hubgate's pid. Defaults to `hubgate.pid` in `data_dir`.""",
    )

    @default("pid_file")
    def _default_pid_file(self):
        return os.path.join(self.data_dir, "hubgate.pid")

    @default("auth_token")
    def _auth_token_default(self):
        # Kept across restarts (unlike configurable-http-proxy's), so that a hubgate left
        # running by the previous hub can be taken over.
        return os.environ.get("CONFIGPROXY_AUTH_TOKEN") or self._secrets["proxy_token"]

    def __init__(self, **kwargs):
        self._secrets_cache = None
        self._manual_service = False
        self._stderr_tail = deque(maxlen=20)
        super().__init__(**kwargs)
        if self.app is not None:
            self._register_with_hub()

    # ----- secrets and the data directory ---------------------------------------------------

    @property
    def _secrets(self):
        """The secrets in the data directory, created on first use."""
        if self._secrets_cache is None:
            self._secrets_cache = self._load_secrets()
        return self._secrets_cache

    def _load_secrets(self):
        path = os.path.join(self.data_dir, SECRETS_FILE)
        wanted = ("proxy_token", "api_token", "session_secret")
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            try:
                with open(path) as f:
                    stored = json.load(f)
            except FileNotFoundError:
                stored = {}
            if all(isinstance(stored.get(k), str) and stored[k] for k in wanted):
                return stored
            fresh = {k: stored.get(k) or secrets.token_hex(32) for k in wanted}
            tmp = f"{path}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(fresh, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return fresh
        except (OSError, ValueError) as e:
            raise self._fail(
                f"hubgate cannot keep its secrets in its data directory {self.data_dir} "
                f"({path}): {_reason(e)}; set c.HubgateProxy.data_dir to a writable directory"
            ) from None

    def _prepare_data_dir(self):
        """Make sure hubgate can write its store (and the pid file can be written)."""
        dirs = [os.path.dirname(os.path.abspath(self.pid_file))]
        if not self.redis_url:
            dirs.append(self.storage_path)
        for d in dirs:
            try:
                os.makedirs(d, exist_ok=True)
                probe = os.path.join(d, f".hubgate-write-test.{os.getpid()}")
                with open(probe, "w"):
                    pass
                os.remove(probe)
            except OSError as e:
                raise self._fail(
                    f"hubgate cannot write its data directory {d}: {_reason(e)}; "
                    "set c.HubgateProxy.data_dir to a writable directory"
                ) from None

    def _fail(self, message):
        """Log the cause of a failed start as one line, and return it as the exception."""
        self.log.critical(message)
        return HubgateStartError(message)

    # ----- registering hubgate with the hub ----------------------------------------------------

    def _register_with_hub(self):
        """Add hubgate's service, role and user scope to the hub's configuration.

        Runs while the hub builds its proxy, before it reads `services`, `load_roles` and
        `extra_user_scopes`, so they are created as if the administrator had written them.
        """
        app = self.app
        name = self.service_name
        if any(spec.get("name") == name for spec in app.services):
            self._manual_service = True
            self.log.info(
                "The hub service %r is configured by hand: hubgate gets no registration or "
                "authentication flags from HubgateProxy",
                name,
            )
            return
        service = {"name": name, "api_token": self._secrets["api_token"]}
        if self.edge_auth:
            service.update(
                oauth_client_id=self.oauth_client_id,
                oauth_redirect_uri=self.oauth_callback_url,
                oauth_no_confirm=True,
                oauth_client_allowed_scopes=["access:servers"],
            )
        app.services = [*app.services, service]
        # `proxy` for hubgate's start-up handshake, `read:users:groups` for group grants.
        role = {"name": name, "scopes": ["proxy", "read:users:groups"], "services": [name]}
        roles = list(app.load_roles)
        if self.edge_auth:
            scope = f"access:services!service={name}"
            # The hub ignores extra_user_scopes when load_roles redefines the user role.
            for i, spec in enumerate(roles):
                if spec.get("name") == "user" and "scopes" in spec:
                    roles[i] = {**spec, "scopes": [*spec["scopes"], scope]}
                    break
            else:
                app.extra_user_scopes = {*app.extra_user_scopes, scope}
        app.load_roles = [*roles, role]
        self.log.info(
            "Registered hubgate as the hub service %r (authentication at the edge %s)",
            name,
            "on" if self.edge_auth else "off",
        )

    @property
    def oauth_client_id(self):
        return f"service-{self.service_name}"

    # ----- starting and stopping -----------------------------------------------------------

    def _binary(self):
        if self.command:
            return self.command[0]
        try:
            return find_hubgate_bin()
        except FileNotFoundError as e:
            raise self._fail(str(e)) from None

    def _command_line(self, binary):
        cmd = [binary, *self.command[1:]]
        if self.redis_url:
            cmd += ["--storage-backend", "redis"]
        else:
            cmd += ["--storage-backend", "file", "--storage-path", self.storage_path]
        if not self._manual_service:
            cmd += ["--hub-api-url", url_path_join(self.hub.url, "api").rstrip("/")]
            if self.edge_auth:
                cmd += ["--oauth-client-id", self.oauth_client_id]
                cmd += ["--oauth-callback-url", self.oauth_callback_url]
            else:
                cmd += ["--auth-mode", "off"]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        cmd += self.extra_args

        public = Server.from_url(self.public_url)
        if public._unix_socket:
            cmd += ["--socket", unquote(public.connect_addr)]
        else:
            cmd += ["--ip", public.ip, "--port", str(public.port)]
        api = Server.from_url(self.api_url)
        if api._unix_socket:
            cmd += ["--api-socket", unquote(api.connect_addr)]
        else:
            cmd += ["--api-ip", api.ip, "--api-port", str(api.port)]
        cmd += ["--error-target", url_path_join(self.hub.url, "error")]
        cmd += ["--log-level", self.log_level]
        if self.app is not None and self.app.subdomain_host:
            cmd.append("--host-routing")
        if self.ssl_key:
            cmd += ["--ssl-key", self.ssl_key]
        if self.ssl_cert:
            cmd += ["--ssl-cert", self.ssl_cert]
        if self.app is not None and self.app.internal_ssl:
            cmd += self._get_ssl_options()
        return cmd

    def _environment(self):
        env = os.environ.copy()
        env["CONFIGPROXY_AUTH_TOKEN"] = self.auth_token
        if not self._manual_service:
            env["JUPYTERHUB_API_TOKEN"] = self._secrets["api_token"]
            env["HUBGATE_SESSION_SECRETS"] = self._secrets["session_secret"]
        if self.redis_url:
            env["HUBGATE_REDIS_URL"] = self.redis_url
        return env

    async def start(self):
        """Start hubgate (or take over the one a previous hub left running)."""
        binary = self._binary()
        if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
            reason = "is not executable" if os.path.isfile(binary) else "does not exist"
            raise self._fail(f"the hubgate binary {binary} {reason}")
        self._prepare_data_dir()
        if self._outlives_hub and await self._take_over(binary):
            self._watch()
            return
        self._check_previous_process()

        cmd = self._command_line(binary)
        public = Server.from_url(self.public_url)
        self.log.info("Starting hubgate @ %s", public.bind_url)
        self.log.debug("hubgate command: %s", cmd)
        try:
            self.proxy_process = Popen(
                cmd,
                env=self._environment(),
                start_new_session=True,
                umask=self.command_umask,
                # A hubgate that may outlive the hub keeps the hub's stderr (as
                # configurable-http-proxy does): a pipe would lose its reader with the hub.
                stderr=None if self._outlives_hub else PIPE,
            )
        except OSError as e:
            raise self._fail(f"the hubgate binary {binary} cannot run: {_reason(e)}") from None
        self._stderr_tail.clear()
        if self.proxy_process.stderr is not None:
            self._relay_stderr(self.proxy_process)
        self._write_pid_file()
        await self._wait_ready(public, Server.from_url(self.api_url))
        self._watch()

    @property
    def _outlives_hub(self):
        """Whether hubgate keeps running when the hub stops (`JupyterHub.cleanup_proxy`)."""
        return self.app is not None and not self.app.cleanup_proxy

    def _relay_stderr(self, process):
        """Copy hubgate's log to the hub's stderr, keeping the last lines to explain a failure."""
        tail = self._stderr_tail

        def relay():
            out = getattr(sys.stderr, "buffer", None)
            for line in process.stderr:
                tail.append(line.decode("utf-8", "replace").rstrip())
                if out is not None:
                    out.write(line)
                    out.flush()

        threading.Thread(target=relay, name="hubgate-stderr", daemon=True).start()

    async def _wait_ready(self, public, api):
        """Wait until both ports accept connections; fail with hubgate's own reason if it exits."""
        process = self.proxy_process
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = process.poll()
            if status is not None:
                # Let the relay thread read the last lines.
                await asyncio.sleep(0.2)
                why = next((line for line in reversed(self._stderr_tail) if line), "")
                why = _strip_log_prefix(why) if why else "its reason is in the lines above"
                self._remove_process_files()
                raise self._fail(f"hubgate exited with code {status} while starting: {why}")
            try:
                await asyncio.gather(public.wait_up(0.5), api.wait_up(0.5))
            except Exception:
                continue
            self.log.debug("hubgate started and answers on both ports")
            return
        self._terminate()
        self._remove_process_files()
        raise self._fail(
            f"hubgate did not open {public.bind_url} and its API {api.bind_url} within 15 s"
        )

    def _watch(self):
        from tornado.ioloop import PeriodicCallback

        if self._check_running_callback is not None:
            self._check_running_callback.stop()
        pc = PeriodicCallback(self.check_running, 1e3 * self.check_running_interval)
        self._check_running_callback = pc
        pc.start()

    async def _take_over(self, binary):
        """Use a hubgate that a previous hub left running (`cleanup_proxy = False`).

        Only with `cleanup_proxy = False` (a hubgate left behind by a hub that crashed is
        restarted, as configurable-http-proxy is: its log went to a pipe that is gone), and only
        when the pid file names a live process running this very binary (Linux: its
        /proc/<pid>/exe) whose API answers this class's token; otherwise the base class stops
        what the pid file names, as it does for configurable-http-proxy.
        """
        try:
            with open(self.pid_file) as f:
                pid = int(f.read().strip())
            exe = os.readlink(f"/proc/{pid}/exe")
        except (OSError, ValueError):
            return False
        if os.path.realpath(exe) != os.path.realpath(binary):
            return False
        try:
            await self._request("GET", "api/proxy?limit=0", retry=False)
        except Exception as e:
            self.log.warning("hubgate[%s] is running but not usable (%s); restarting it", pid, e)
            return False
        self.proxy_process = _RunningHubgate(pid)
        self.log.info("hubgate[%s], left running by the previous hub, is taken over", pid)
        return True

    async def stop(self):
        """SIGTERM, then wait for hubgate to drain (its store is free for the next one)."""
        if self.proxy_process is None:
            return
        self.log.info("Stopping hubgate[%i]...", self.proxy_process.pid)
        if self._check_running_callback is not None:
            self._check_running_callback.stop()
        if self.proxy_process.poll() is None:
            try:
                self._terminate()
            except Exception as e:
                self.log.error("Failed to stop hubgate: %s", e)
            deadline = time.monotonic() + self.stop_timeout
            while self.proxy_process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.proxy_process.poll() is None:
                self.log.warning("hubgate did not stop in %s s; killing it", self.stop_timeout)
                self.proxy_process.kill()
        self._remove_process_files()

    # ----- the route API ---------------------------------------------------------------------

    async def _request(self, method, path, body=None, headers=None, retry=True):
        """A request to hubgate's API; retried like the base class's while hubgate starts."""
        url = url_path_join(self.api_url, path)
        headers = {"Authorization": f"token {self.auth_token}", **(headers or {})}
        data = json.dumps(body) if body is not None else None

        async def attempt():
            try:
                async with self.semaphore:
                    resp = await fetch(
                        url, method=method, headers=headers, data=data, raise_for_status=False
                    )
                    text = await resp.text()
            except ClientConnectionError as e:
                if not retry:
                    raise
                self.log.warning("hubgate API %s %s: %s, retrying", method, path, e)
                return False
            if resp.status >= 500 and retry:
                self.log.warning("hubgate API %s %s: %s, retrying", method, path, resp.status)
                return False
            if resp.status >= 400:
                raise HubgateAPIError(method, path, resp.status, text)
            return resp, text

        if not retry:
            return await attempt()
        return await exponential_backoff(
            attempt, f"hubgate API {method} {path} kept failing", timeout=30
        )

    async def add_route(self, routespec, target, data):
        batch = _batch.get()
        if batch is None:
            return await super().add_route(routespec, target, data)
        path = self._routespec_to_chp_path(routespec)
        batch.add[path] = {**(data or {}), "target": target, "jupyterhub": True}

    async def delete_route(self, routespec):
        batch = _batch.get()
        if batch is None:
            return await super().delete_route(routespec)
        batch.remove.append(self._routespec_to_chp_path(routespec))

    async def get_all_routes(self):
        """The whole table, in pages of `page_size`, all from one version of the table."""
        for _ in range(5):
            table, version, offset = {}, None, 0
            while True:
                _, text = await self._request(
                    "GET",
                    f"api/proxy?offset={offset}&limit={self.page_size}",
                    headers={"Accept": PAGINATION},
                )
                page = json.loads(text)
                if version is not None and page.get("version") != version:
                    break
                version = page.get("version")
                table.update(page["items"])
                following = page["_pagination"].get("next")
                if not following:
                    return self._routes_from_table(table)
                offset = following["offset"]
            self.log.debug("hubgate's table changed while it was read in pages; reading again")
        # A table that keeps changing: one unpaged read is consistent by construction.
        _, text = await self._request("GET", "api/proxy")
        return self._routes_from_table(json.loads(text))

    def _routes_from_table(self, table):
        routes = {}
        for chp_path, data in table.items():
            if "jupyterhub" not in data:
                continue
            routespec = self._routespec_from_chp_path(chp_path)
            routes[routespec] = self._reformat_routespec(routespec, data)
        return routes

    async def check_routes(self, user_dict, service_dict, routes=None):
        """The base class's reconcile, with every change it finds sent as one batch."""
        await self._batched(super().check_routes(user_dict, service_dict, routes))

    async def restore_routes(self):
        await self._batched(super().restore_routes())

    async def _batched(self, reconcile):
        batch = _Batch()
        token = _batch.set(batch)
        try:
            await reconcile
        finally:
            _batch.reset(token)
        if not batch:
            return
        batch.remove = [p for p in dict.fromkeys(batch.remove) if p not in batch.add]
        body = {"add": batch.add, "remove": batch.remove}
        self.log.info(
            "Sending hubgate one batch: %i routes to add or update, %i to remove",
            len(batch.add),
            len(batch.remove),
        )
        try:
            await self._request("PATCH", "api/proxy", body)
        except HubgateAPIError as e:
            if e.status != 400:
                raise
            # An invalid entry refuses the whole batch; apply the valid ones one at a time.
            self.log.error("hubgate refused the batch (%s); sending the changes one by one", e)
            await asyncio.gather(
                *(self._post(path, data) for path, data in batch.add.items()),
                *(self._delete(path) for path in batch.remove),
                return_exceptions=True,
            )

    async def _post(self, path, data):
        try:
            await self._request("POST", url_path_join("api/routes", path), data)
        except HubgateAPIError as e:
            self.log.error("hubgate refused the route %s: %s", path, e)

    async def _delete(self, path):
        try:
            await self._request("DELETE", url_path_join("api/routes", path))
        except HubgateAPIError as e:
            if e.status != 404:
                self.log.error("hubgate refused to remove the route %s: %s", path, e)


class HubgateAPIError(Exception):
    """hubgate's API answered 4xx (or 5xx once retries are over)."""

    def __init__(self, method, path, status, text):
        super().__init__(f"{method} {path}: {status} {text.strip()[:300]}")
        self.status = status


def _reason(error):
    """An OSError's reason without its file name (the message names the path already)."""
    return getattr(error, "strerror", None) or str(error)


def _strip_log_prefix(line):
    """hubgate's error line without a leading timestamp and level, if it has them."""
    for marker in (" ERROR ", " error: ", "error: "):
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return line.strip()
