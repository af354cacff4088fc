"""A pytest plugin that runs JupyterHub's own test modules with HubgateProxy as the proxy class.

Not part of .ci/python.sh (JupyterHub's tests need their own extras and a
`configurable-http-proxy` on PATH for test_external_proxy). To run test_proxy by hand, in a venv
with the wheel and `jupyterhub[test]`'s lighter extras (beautifulsoup4[html5lib], cryptography,
jsonschema, mock, requests-mock, pytest-rerunfailures, virtualenv), from an empty directory,
with a `configurable-http-proxy` on PATH that runs `exec hubgate "$@"`:

    PYTHONPATH=<repo>/tests/python python -m pytest -p jupyterhub_suite \\
        --pyargs jupyterhub.tests.test_proxy -o asyncio_mode=auto \\
        -o asyncio_default_fixture_loop_scope=module -o asyncio_default_test_loop_scope=module

With JupyterHub 6.1.1: 32 passed, 2 skipped (the subdomain cases, which need
JUPYTERHUB_TEST_SUBDOMAIN_HOST and a wildcard DNS name).
"""

import jupyterhub.tests.mocking as mocking
from jupyterhub_hubgate.proxy import HubgateProxy

_init = mocking.MockHub.__init__


def _init_with_hubgate(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.proxy_class = HubgateProxy


mocking.MockHub.__init__ = _init_with_hubgate
