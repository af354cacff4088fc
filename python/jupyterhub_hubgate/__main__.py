"""`python -m jupyterhub_hubgate ARGS` runs the packaged hubgate with ARGS."""

import os
import sys

from jupyterhub_hubgate import find_hubgate_bin

if __name__ == "__main__":
    hubgate = find_hubgate_bin()
    if sys.platform == "win32":
        import subprocess

        sys.exit(subprocess.call([hubgate, *sys.argv[1:]]))
    os.execvp(hubgate, [hubgate, *sys.argv[1:]])
