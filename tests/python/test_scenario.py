"""A real JupyterHub whose only hubgate setting is `c.JupyterHub.proxy_class = "hubgate"`.

One hub for the whole module (DummyAuthenticator, users' servers are singleuser.py processes),
driven step by step in file order:
1. alice logs in with a real browser (headless Chromium) through hubgate's OAuth and the hub's
   login form, and sees a page of her server and the answer of a websocket that page opened
   with the session cookie;
2. alice's API token reaches her server (HTTP and websocket); bob's token does not; no
   credentials do not;
3. bob, logged in with his own browser, reaches his server but his session is refused on
   alice's;
4. hubgate killed with SIGKILL is restarted by the class, and alice's route is served again;
5. the hub stopped with `cleanup_proxy = False` leaves hubgate serving; the hub started again
   takes that hubgate over and finds alice's route there (it adds nothing).
"""

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile

import aiohttp
import pytest
from hubtest import BASE_URL, Hub, eventually
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SESSION_COOKIE = "hubgate-session"
#: alice's browser session from step 1, which must still work after hubgate restarts (step 4).
SESSIONS = {}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hub = Hub(tmp_path_factory.mktemp("scenario"), env={"HUBGATE_PY_KEEP_RUNNING": "1"})
    hub.start()

    async def servers():
        async with aiohttp.ClientSession() as session:
            await hub.wait_up(session)
            for user in ("alice", "bob"):
                await hub.start_server(session, user)

    try:
        asyncio.run(servers())
    except BaseException:
        print(hub.log_tail())
        hub.close()
        raise
    yield hub
    hub.close()


@pytest.fixture(scope="module")
def tokens(hub):
    async def make():
        async with aiohttp.ClientSession() as session:
            return {u: await hub.user_token(session, u) for u in ("alice", "bob")}

    return asyncio.run(make())


class Browser:
    """Headless Chromium with a profile of its own, driven over WebDriver."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="hubgate-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={self.profile}",
        ):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

    def close(self):
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def wait(self, what, condition):
        try:
            return WebDriverWait(self.driver, 30).until(lambda d: condition(d))
        except Exception as e:
            raise AssertionError(
                f"{what}; the browser is at {self.driver.current_url}:\n"
                f"{self.driver.page_source[:2000]}"
            ) from e

    def log_in_through(self, url, user):
        """Opens `url`, which sends a browser without a session through the hub's login."""
        self.driver.get(url)
        self.wait("the hub's login form", lambda d: d.find_elements(By.NAME, "username"))
        assert "/hub/login" in self.driver.current_url, self.driver.current_url
        self.driver.find_element(By.NAME, "username").send_keys(user)
        self.driver.find_element(By.NAME, "password").send_keys("any")
        self.driver.find_element(By.ID, "login_submit").click()

    def session_cookie(self):
        cookie = self.driver.get_cookie(SESSION_COOKIE)
        assert cookie, f"no {SESSION_COOKIE} cookie: {self.driver.get_cookies()}"
        return cookie


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


def page_url(hub, user, what="page"):
    return f"{hub.public}{BASE_URL}user/{user}/{what}"


def test_0_hubgate_keeps_routes_in_the_data_directory_and_no_secret_in_its_argv(hub):
    with open(f"/proc/{hub.hubgate_pid()}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    assert argv[0] == os.path.join(os.path.dirname(sys.executable), "hubgate"), argv
    store = os.path.join(hub.workdir, "hubgate-routes")
    assert ["--storage-backend", "file", "--storage-path", store] == argv[1:5], argv
    assert "--oauth-client-id" in argv and "--auth-mode" not in argv, argv
    assert "--workers" not in argv, "--workers is passed only when set"
    with open(os.path.join(hub.workdir, "hubgate-secrets.json")) as f:
        secrets = json.load(f)
    assert os.stat(os.path.join(hub.workdir, "hubgate-secrets.json")).st_mode & 0o077 == 0
    for name, value in secrets.items():
        assert not any(value in arg for arg in argv), f"the {name} is on the command line"


def test_1_alice_logs_in_with_a_browser_and_her_page_opens_a_websocket(hub, browser):
    browser.log_in_through(page_url(hub, "alice"), "alice")
    ws = browser.wait(
        "alice's page shows her websocket's answer",
        lambda d: (
            d.find_element(By.ID, "ws").text not in ("", "connecting")
            and d.find_element(By.ID, "ws")
        ),
    )
    assert ws.text == "alice got ping"
    assert browser.driver.find_element(By.ID, "owner").text == "server of alice"
    assert browser.driver.current_url == page_url(hub, "alice")
    cookie = browser.session_cookie()
    assert cookie["httpOnly"], cookie
    SESSIONS["alice"] = {"Cookie": f"{cookie['name']}={cookie['value']}"}


async def test_2_tokens_reach_only_their_owners_server(hub, tokens):
    alice, bob = tokens["alice"], tokens["bob"]
    async with aiohttp.ClientSession() as session:
        url = page_url(hub, "alice", "api/status")
        async with session.get(url, headers={"Authorization": f"token {alice}"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["server_of"] == "alice"
        async with session.ws_connect(
            page_url(hub, "alice", "ws"), headers={"Authorization": f"token {alice}"}
        ) as ws:
            await ws.send_str("ping")
            assert (await ws.receive_str(timeout=10)) == "alice got ping"

        async with session.get(url, headers={"Authorization": f"token {bob}"}) as resp:
            body = await resp.text()
            assert resp.status == 403, body
            assert "server_of" not in body
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(
                page_url(hub, "alice", "ws"), headers={"Authorization": f"token {bob}"}
            )
        assert refused.value.status == 403
        async with session.get(url, allow_redirects=False) as resp:
            assert resp.status in (302, 303, 401), resp.status
            assert "server_of" not in await resp.text()


async def test_3_bobs_browser_session_is_refused_on_alices_server(hub, browser):
    browser.log_in_through(page_url(hub, "bob"), "bob")
    browser.wait(
        "bob's page shows his websocket's answer",
        lambda d: d.find_element(By.ID, "ws").text == "bob got ping",
    )
    browser.driver.get(page_url(hub, "alice"))
    assert "server of alice" not in browser.driver.page_source

    cookie = browser.session_cookie()
    jar = {"Cookie": f"{cookie['name']}={cookie['value']}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(page_url(hub, "bob"), headers=jar) as resp:
            assert resp.status == 200
        async with session.get(page_url(hub, "alice"), headers=jar) as resp:
            assert resp.status == 403, await resp.text()


async def alice_answers(hub, session, token):
    url = page_url(hub, "alice", "api/status")
    async with session.get(url, headers={"Authorization": f"token {token}"}) as resp:
        assert resp.status == 200, f"alice's server: {resp.status}"
        assert (await resp.json())["server_of"] == "alice"


async def test_4_hubgate_killed_is_restarted_and_serves_alice_again(hub, tokens):
    killed = hub.hubgate_pid()
    os.kill(killed, signal.SIGKILL)
    async with aiohttp.ClientSession() as session:

        async def restarted():
            assert hub.hubgate_pid() != killed, "no new hubgate yet"
            await alice_answers(hub, session, tokens["alice"])
            assert "New proxy back up and good to go" in hub.log_text(), "routes not restored"

        await eventually("a new hubgate serves alice", restarted, hub=hub)
        # The session secret is kept in the data directory: alice's browser session still works.
        async with session.get(
            page_url(hub, "alice"), headers=SESSIONS["alice"], allow_redirects=False
        ) as resp:
            assert resp.status == 200, resp.status
            assert "server of alice" in await resp.text()
    assert "Proxy stopped with exit code -9" in hub.log_text()


async def test_5_hub_restarted_with_hubgate_left_running_finds_its_routes(hub, tokens):
    pid = hub.hubgate_pid()
    hub.stop()
    assert hub.exited()
    os.kill(pid, 0)  # still running
    first_run = len(hub.log_text())
    async with aiohttp.ClientSession() as session:
        # Served while the hub is down (hubgate still trusts the token it checked).
        await alice_answers(hub, session, tokens["alice"])
        hub.start()
        await hub.wait_up(session)
        await alice_answers(hub, session, tokens["alice"])

        async def checked():
            log = hub.log_text()[first_run:]
            assert "JupyterHub is now running" in log, "the hub has not finished starting"

        await eventually("the restarted hub is running", checked, hub=hub)
    log = hub.log_text()[first_run:]
    assert hub.hubgate_pid() == pid, "the hub restarted hubgate instead of taking it over"
    assert f"hubgate[{pid}], left running by the previous hub, is taken over" in log
    assert "Adding missing route" not in log, "the restarted hub did not find alice's route"
