"""JupyterHub configuration for hubgate's end-to-end test (tests/it/jupyterhub.rs).

It is also the base of the other end-to-end configurations in this directory
(jupyterhub_restart_config.py, jupyterhub_auth_config.py), which load it and
then change what their test needs.

The test starts `jupyterhub -f tests/e2e/jupyterhub_config.py` with the hub's
working directory set to a fresh temporary directory and passes everything that
changes from run to run in HUBGATE_E2E_* environment variables. The hub starts
hubgate itself, exactly as it would start configurable-http-proxy: only the
command, the API address, the token and the liveness-check interval are set.

To run it by hand, export the variables below (any free ports, any tokens of 8
or more characters) and start jupyterhub from the directory that should hold
the database and pid files.
"""

import os

# `jupyterhub -f` runs this file with get_config() defined (traitlets).
c = get_config()  # noqa: F821
env = os.environ

# Ports picked by the test; everything binds on loopback only.
public_port = int(env["HUBGATE_E2E_PUBLIC_PORT"])
api_port = int(env["HUBGATE_E2E_API_PORT"])
hub_port = int(env["HUBGATE_E2E_HUB_PORT"])
workdir = env["HUBGATE_E2E_WORKDIR"]
here = os.path.dirname(os.path.abspath(__file__))

# JupyterHub's own test suite uses this base URL: the `@` and the encoded space
# catch a proxy that stores or matches route keys in the wrong encoding.
c.JupyterHub.bind_url = f"http://127.0.0.1:{public_port}/@/space%20word/"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{hub_port}"

# The proxy: hubgate instead of configurable-http-proxy, and nothing else.
c.ConfigurableHTTPProxy.command = [env["HUBGATE_E2E_PROXY_COMMAND"]]
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{api_port}"
c.ConfigurableHTTPProxy.auth_token = env["HUBGATE_E2E_PROXY_TOKEN"]
# The hub polls its proxy child this often and restarts it when it has exited.
c.ConfigurableHTTPProxy.check_running_interval = 1
c.ConfigurableHTTPProxy.pid_file = os.path.join(workdir, "jupyterhub-proxy.pid")

# Reconcile the route table (GET /api/routes, re-add missing, delete stale) every
# 2 s, as JupyterHub's own tests do, so key-encoding bugs show up as churn.
c.JupyterHub.last_activity_interval = 2

# State of the hub itself, all inside the temporary directory.
c.JupyterHub.db_url = "sqlite:///" + os.path.join(workdir, "jupyterhub.sqlite")
c.JupyterHub.cookie_secret_file = os.path.join(workdir, "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = os.path.join(workdir, "jupyterhub.pid")
c.JupyterHub.log_level = "DEBUG"

# Anyone may log in; the test creates users through the REST API.
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True

# The fake single-user server. The "simple" spawner is LocalProcessSpawner
# without the switch to a system user of the same name (there is no user
# "alice" on the machine); it only changes into the home directory below.
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = os.path.join(workdir, "home", "{username}")
c.Spawner.cmd = [env["HUBGATE_E2E_PYTHON"], os.path.join(here, "singleuser.py")]
c.Spawner.start_timeout = 30
c.Spawner.http_timeout = 30

# A token with the admin role for the test to drive the hub's REST API.
c.JupyterHub.services = [{"name": "e2e", "api_token": env["HUBGATE_E2E_ADMIN_TOKEN"]}]
c.JupyterHub.load_roles = [{"name": "admin", "services": ["e2e"]}]
