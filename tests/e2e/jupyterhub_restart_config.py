"""JupyterHub configuration for hubgate's restart test (tests/it/jupyterhub_restart.rs).

Everything in jupyterhub_config.py (ports, base URL, the fake single-user
server, the admin service `e2e`), except that the hub does not start its proxy:
the test starts and kills hubgate itself, and the hub only talks to hubgate's
API at HUBGATE_E2E_API_PORT with the shared token.

hubgate is registered as a service whose token (HUBGATE_E2E_HUBGATE_TOKEN, the
JUPYTERHUB_API_TOKEN the test gives hubgate) has the `proxy` scope, so that
hubgate's start-up handshake (`POST /hub/api/proxy`) makes the hub reconcile.
The hub's own periodic reconcile runs every 300 s, JupyterHub's default, so
within a test only the handshake can bring routes back to a restarted hubgate.
"""

import os

# `jupyterhub -f` runs this file with get_config() defined (traitlets).
c = get_config()  # noqa: F821
env = os.environ

here = os.path.dirname(os.path.abspath(__file__))
# load_subconfig is provided by traitlets; it ignores a missing file, hence the check.
load_subconfig(os.path.join(here, "jupyterhub_config.py"))  # noqa: F821
assert c.JupyterHub.spawner_class == "simple", "jupyterhub_config.py was not loaded"


c.ConfigurableHTTPProxy.should_start = False
c.JupyterHub.last_activity_interval = 300

c.JupyterHub.services = [
    {"name": "e2e", "api_token": env["HUBGATE_E2E_ADMIN_TOKEN"]},
    {"name": "hubgate", "api_token": env["HUBGATE_E2E_HUBGATE_TOKEN"]},
]
c.JupyterHub.load_roles = [
    {"name": "admin", "services": ["e2e"]},
    {"name": "hubgate-proxy", "scopes": ["proxy"], "services": ["hubgate"]},
]
