"""hubgate for JupyterHub: the packaged binary and the Proxy class that runs it.

`c.JupyterHub.proxy_class = "hubgate"` selects :class:`jupyterhub_hubgate.proxy.HubgateProxy`
(registered under the ``jupyterhub.proxies`` entry point). This module imports nothing from
JupyterHub, so that :func:`find_hubgate_bin` works without it.
"""

import os
import sys
import sysconfig

__all__ = ["find_hubgate_bin"]


def _candidates():
    """Where pip puts this package's `hubgate`, for the interpreter running now.

    The scripts directory of the running interpreter's installation comes first (a venv's
    `bin/`), then the user scheme's (`pip install --user`), then `bin/` beside the package's
    directory (`pip install --target DIR`). Never `PATH`: another `hubgate` there may be a
    different version, or not hubgate at all.
    """
    exe = "hubgate" + (sysconfig.get_config_var("EXE") or "")
    yield os.path.join(sysconfig.get_path("scripts"), exe)
    if sys.version_info >= (3, 10):
        user_scheme = sysconfig.get_preferred_scheme("user")
    elif os.name == "nt":
        user_scheme = "nt_user"
    elif sys.platform == "darwin" and sys._framework:
        user_scheme = "osx_framework_user"
    else:
        user_scheme = "posix_user"
    yield os.path.join(sysconfig.get_path("scripts", scheme=user_scheme), exe)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    yield os.path.join(package_parent, "bin", exe)


def find_hubgate_bin():
    """The path of the `hubgate` executable installed with this package.

    Raises FileNotFoundError naming every place looked at when there is none.
    """
    looked = []
    for path in _candidates():
        if os.path.isfile(path):
            return path
        looked.append(path)
    raise FileNotFoundError(
        "the hubgate binary of the jupyterhub-hubgate package is missing (looked at "
        + ", ".join(looked)
        + "); reinstall it with `pip install --force-reinstall jupyterhub-hubgate`"
    )
