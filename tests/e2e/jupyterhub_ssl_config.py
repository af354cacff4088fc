"""JupyterHub configuration for hubgate's internal_ssl test (tests/it/jupyterhub_ssl.rs).

Everything in jupyterhub_config.py (ports, base URL, token, the admin service
`e2e`), with JupyterHub's `internal_ssl` turned on:

- The hub creates its own CAs and certificates (certipy) under
  `<workdir>/internal-ssl`: `hub-ca`, `proxy-api-ca`, `proxy-client-ca`,
  `notebooks-ca`, `services-ca`, the hub's `hub-internal` pair and the proxy's
  `proxy-api` and `proxy-client` pairs (SANs IP:127.0.0.1, IP:::1,
  DNS:localhost), and one trust bundle per CA.
- It starts hubgate with `--api-ssl-key/-cert/-ca --api-ssl-request-cert
  --api-ssl-reject-unauthorized` (its API is mutual TLS) and
  `--client-ssl-key/-cert/-ca --client-ssl-request-cert
  --client-ssl-reject-unauthorized` (what hubgate presents to, and trusts of,
  `https://` targets), after CHP's usual flags.
- The hub itself serves HTTPS and requires a client certificate from any of its
  CAs; its route in the proxy is `https://127.0.0.1:<hub port>`.
- Each user's server gets its own pair signed by `notebooks-ca` (in
  JUPYTERHUB_SSL_KEYFILE / JUPYTERHUB_SSL_CERTFILE, and the bundle
  JUPYTERHUB_SSL_CLIENT_CA it must verify clients against), and its route is
  `https://127.0.0.1:<port>`. The fake server is singleuser_ssl.py, the TLS
  variant of singleuser.py.

The public port stays plain HTTP: internal_ssl secures only the hub's internal
connections.
"""

import os

# `jupyterhub -f` runs this file with get_config() defined (traitlets).
c = get_config()  # noqa: F821
env = os.environ

here = os.path.dirname(os.path.abspath(__file__))
# load_subconfig is provided by traitlets; it ignores a missing file, hence the check.
load_subconfig(os.path.join(here, "jupyterhub_config.py"))  # noqa: F821
assert c.JupyterHub.spawner_class == "simple", "jupyterhub_config.py was not loaded"

api_port = int(env["HUBGATE_E2E_API_PORT"])
hub_port = int(env["HUBGATE_E2E_HUB_PORT"])
workdir = env["HUBGATE_E2E_WORKDIR"]

c.JupyterHub.internal_ssl = True
c.JupyterHub.internal_certs_location = os.path.join(workdir, "internal-ssl")
# The hub serves HTTPS on its own port (internal_ssl makes it so whatever the
# scheme here; say it anyway) and reaches hubgate's API over HTTPS.
c.JupyterHub.hub_bind_url = f"https://127.0.0.1:{hub_port}"
c.ConfigurableHTTPProxy.api_url = f"https://127.0.0.1:{api_port}"

c.Spawner.cmd = [env["HUBGATE_E2E_PYTHON"], os.path.join(here, "singleuser_ssl.py")]
