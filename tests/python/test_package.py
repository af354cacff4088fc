"""The installed package: its own binary, its settings in the hub's help."""

import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def test_the_package_finds_its_own_binary_not_the_first_on_path(tmp_path):
    impostor = tmp_path / "hubgate"
    impostor.write_text("#!/bin/sh\necho impostor\n")
    impostor.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    code = "from jupyterhub_hubgate import find_hubgate_bin; print(find_hubgate_bin())"
    found = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert found == os.path.join(os.path.dirname(sys.executable), "hubgate")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("hubgate "), version.stdout


def test_python_m_runs_the_packaged_binary():
    run = subprocess.run(
        [sys.executable, "-m", "jupyterhub_hubgate", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.startswith("hubgate "), run.stdout


def test_the_hub_documents_the_settings():
    run = subprocess.run(
        [os.path.join(BIN, "jupyterhub"), "--help-all"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    for setting in ("edge_auth", "workers", "redis_url", "extra_args", "data_dir"):
        assert f"--HubgateProxy.{setting}=" in run.stdout, setting
