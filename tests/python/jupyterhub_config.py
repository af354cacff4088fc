"""The hub of tests/python: hubgate through `c.JupyterHub.proxy_class = "hubgate"` alone.

The line after `c = get_config()` is the whole hubgate configuration, as an administrator
writes it. Everything below it is the test's environment, read from HUBGATE_PY_* variables that
hubtest.py sets: loopback ports, the hub's state in a temporary directory, the
DummyAuthenticator, a spawner, and an admin token for the test to drive the hub's REST API.
"""

import os
import sys

# `jupyterhub -f` runs this file with get_config() defined (traitlets).
c = get_config()  # noqa: F821
c.JupyterHub.proxy_class = "hubgate"

# ----- the test's environment -----------------------------------------------------------------
env = os.environ
here = os.path.dirname(os.path.abspath(__file__))
workdir = env["HUBGATE_PY_WORKDIR"]

c.JupyterHub.bind_url = f"http://127.0.0.1:{env['HUBGATE_PY_PUBLIC_PORT']}/@/space%20word/"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{env['HUBGATE_PY_HUB_PORT']}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env['HUBGATE_PY_API_PORT']}"

c.JupyterHub.db_url = "sqlite:///" + os.path.join(workdir, "jupyterhub.sqlite")
c.JupyterHub.cookie_secret_file = os.path.join(workdir, "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = os.path.join(workdir, "jupyterhub.pid")
c.JupyterHub.log_level = "DEBUG"

c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True

if env.get("HUBGATE_PY_SPAWNER") == "shared":
    # Every server is the one backend at HUBGATE_PY_BACKEND_PORT: many "running" servers
    # without a process each (the route-reconcile test and benchmark).
    sys.path.insert(0, here)
    c.JupyterHub.spawner_class = "hubtest.SharedBackendSpawner"
else:
    # Each user's server is singleuser.py, a real process with a page and a websocket.
    c.JupyterHub.spawner_class = "simple"
    c.SimpleLocalProcessSpawner.home_dir_template = os.path.join(workdir, "home", "{username}")
    c.Spawner.cmd = [sys.executable, os.path.join(here, "singleuser.py")]
    c.Spawner.environment = {"HUBGATE_PY_WORKDIR": workdir}
c.Spawner.start_timeout = 30
c.Spawner.http_timeout = 30

if env.get("HUBGATE_PY_KEEP_RUNNING"):
    # The hub stops without stopping its proxy or the users' servers (a hub upgrade).
    c.JupyterHub.cleanup_proxy = False
    c.JupyterHub.cleanup_servers = False

if env.get("HUBGATE_PY_EDGE_AUTH") == "off":
    c.HubgateProxy.edge_auth = False

# Bad input, for the tests of how a failed start is reported.
if env.get("HUBGATE_PY_COMMAND"):
    c.HubgateProxy.command = [env["HUBGATE_PY_COMMAND"]]
if env.get("HUBGATE_PY_DATA_DIR"):
    c.HubgateProxy.data_dir = env["HUBGATE_PY_DATA_DIR"]

if env.get("HUBGATE_PY_PROXY_CLASS"):
    # The benchmark's other row: JupyterHub's own class, driving the same hubgate binary.
    c.JupyterHub.proxy_class = env["HUBGATE_PY_PROXY_CLASS"]
    c.ConfigurableHTTPProxy.command = [env["HUBGATE_PY_PROXY_COMMAND"]]
    c.ConfigurableHTTPProxy.auth_token = env["HUBGATE_PY_PROXY_TOKEN"]

c.JupyterHub.services = [{"name": "test-admin", "api_token": env["HUBGATE_PY_ADMIN_TOKEN"]}]
c.JupyterHub.load_roles = [{"name": "admin", "services": ["test-admin"]}]
