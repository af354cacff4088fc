"""JupyterHub configuration for hubgate's authentication test (tests/it/jupyterhub_auth.rs).

Everything in jupyterhub_config.py (ports, base URL, the fake single-user
server, the admin service `e2e`); in addition hubgate authenticates requests to
users' servers against this hub and logs browsers in through it:

- hubgate is the registered service `hubgate`, an OAuth client
  (`service-hubgate`) whose callback is HUBGATE_E2E_CALLBACK_URL on hubgate's
  public port, with the `proxy` and `read:users:groups` scopes for its own
  token. That token is the service's `api_token`, and the test puts it in the
  hub's environment as JUPYTERHUB_API_TOKEN: JupyterHub starts the proxy with a
  copy of its own environment plus CONFIGPROXY_AUTH_TOKEN (jupyterhub/proxy.py,
  ConfigurableHTTPProxy.start), so hubgate finds its token there.
- The hub starts hubgate with the flags that turn authentication on
  (`--hub-api-url`, `--oauth-client-id`, `--oauth-callback-url`) in front of
  its own CHP flags, and `--identity-header` so that the fake single-user
  server can record who hubgate let through.
- Users may use the hubgate service (`access:services!service=hubgate`): the
  hub's authorize endpoint refuses an OAuth login to a service the user has no
  access scope for, and the default `user` role has none.
- The fake single-user servers record every request they receive under
  HUBGATE_E2E_REQUEST_LOG_DIR.
"""

import os

# `jupyterhub -f` runs this file with get_config() defined (traitlets).
c = get_config()  # noqa: F821
env = os.environ

here = os.path.dirname(os.path.abspath(__file__))
# load_subconfig is provided by traitlets; it ignores a missing file, hence the check.
load_subconfig(os.path.join(here, "jupyterhub_config.py"))  # noqa: F821
assert c.JupyterHub.spawner_class == "simple", "jupyterhub_config.py was not loaded"


hub_port = int(env["HUBGATE_E2E_HUB_PORT"])
callback_url = env["HUBGATE_E2E_CALLBACK_URL"]
hub_api_url = f"http://127.0.0.1:{hub_port}/@/space%20word/hub/api"

c.ConfigurableHTTPProxy.command = [
    env["HUBGATE_E2E_PROXY_COMMAND"],
    "--hub-api-url",
    hub_api_url,
    "--oauth-client-id",
    "service-hubgate",
    "--oauth-callback-url",
    callback_url,
    "--identity-header",
    "X-Hubgate-User",
]

c.JupyterHub.services = [
    {"name": "e2e", "api_token": env["HUBGATE_E2E_ADMIN_TOKEN"]},
    {
        "name": "hubgate",
        "api_token": env["JUPYTERHUB_API_TOKEN"],
        "oauth_client_id": "service-hubgate",
        "oauth_redirect_uri": callback_url,
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": ["access:servers"],
    },
]
c.JupyterHub.load_roles = [
    {"name": "admin", "services": ["e2e"]},
    {
        "name": "hubgate",
        "scopes": ["proxy", "read:users:groups"],
        "services": ["hubgate"],
    },
]
c.JupyterHub.extra_user_scopes = {"access:services!service=hubgate"}

c.Spawner.environment = {
    "HUBGATE_E2E_REQUEST_LOG_DIR": os.path.join(env["HUBGATE_E2E_WORKDIR"], "requests"),
}
