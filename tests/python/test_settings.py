"""`c.HubgateProxy.edge_auth = False`: hubgate forwards as configurable-http-proxy does."""

import os

import aiohttp
from hubtest import BASE_URL, Hub


async def test_edge_auth_off_lets_requests_through_and_registers_no_oauth_client(tmp_path):
    hub = Hub(tmp_path / "hub", env={"HUBGATE_PY_EDGE_AUTH": "off"})
    try:
        hub.start()
        async with aiohttp.ClientSession() as session:
            await hub.wait_up(session)
            await hub.start_server(session, "alice")
            url = f"{hub.public}{BASE_URL}user/alice/api/status"
            async with session.get(url, allow_redirects=False) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["server_of"] == "alice"
            service = await hub.hub_request(session, "GET", "/services/hubgate")
            assert not service.get("oauth_client_id"), service
        with open(f"/proc/{hub.hubgate_pid()}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        assert argv[argv.index("--auth-mode") + 1] == "off", argv
        assert "--oauth-client-id" not in argv
        assert os.path.exists(os.path.join(hub.workdir, "hubgate-routes"))
    finally:
        hub.close()
