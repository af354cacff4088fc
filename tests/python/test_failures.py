"""Bad input stops the hub's start with one line naming the cause."""

import socket
import stat
import subprocess
import sys
import time

import pytest
from hubtest import Hub


def failed_start(hub, patience=60):
    """The hub's exit status and log, once it has exited (it must, by itself)."""
    hub.start()
    deadline = time.monotonic() + patience
    while not hub.exited():
        assert time.monotonic() < deadline, f"the hub did not exit\n{hub.log_tail()}"
        time.sleep(0.2)
    return hub.process.returncode, hub.log_text()


def critical_lines(log):
    return [line for line in log.splitlines() if line.startswith("[C ")]


@pytest.mark.parametrize("kind", ["missing", "not executable"])
def test_a_bad_binary_is_named(tmp_path, kind):
    binary = tmp_path / "hubgate"
    if kind == "not executable":
        binary.write_text("#!/bin/sh\n")
        binary.chmod(stat.S_IRUSR | stat.S_IWUSR)
    hub = Hub(tmp_path / "hub", env={"HUBGATE_PY_COMMAND": str(binary)})
    try:
        status, log = failed_start(hub)
    finally:
        hub.close()
    assert status != 0
    reason = "does not exist" if kind == "missing" else "is not executable"
    assert f"the hubgate binary {binary} {reason}" in critical_lines(log)[0], log[-3000:]


def test_a_data_directory_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data_dir = blocker / "data"
    hub = Hub(tmp_path / "hub", env={"HUBGATE_PY_DATA_DIR": str(data_dir)})
    try:
        status, log = failed_start(hub)
    finally:
        hub.close()
    assert status != 0
    first = critical_lines(log)[0]
    assert f"cannot keep its secrets in its data directory {data_dir}" in first, log[-3000:]
    assert "Not a directory" in first


def test_a_hubgate_that_cannot_bind_is_named(tmp_path):
    hub = Hub(tmp_path / "hub")
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    taken.bind(("127.0.0.1", hub.public_port))
    taken.listen()
    try:
        status, log = failed_start(hub)
    finally:
        taken.close()
        hub.close()
    assert status != 0
    first = critical_lines(log)[0]
    assert "hubgate exited with code" in first and "while starting: " in first, log[-3000:]
    assert str(hub.public_port) in first, first


def test_an_older_jupyterhub_is_refused_naming_both_versions():
    code = "import jupyterhub\njupyterhub.__version__ = '5.4.2'\nimport jupyterhub_hubgate.proxy\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: jupyterhub-hubgate needs JupyterHub 6.0 or newer; "
        "this hub is JupyterHub 5.4.2"
    ), run.stderr
