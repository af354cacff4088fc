"""A small real single-user server for tests/python: a page, a websocket, and JSON.

The hub's spawner starts it with everything in the environment (JUPYTERHUB_SERVICE_URL,
JUPYTERHUB_SERVICE_PREFIX, JUPYTERHUB_USER). Under its prefix it answers:
- `page`: HTML whose script opens the websocket `ws` (with the browser's cookies, as
  JupyterLab's kernels do), sends "ping" and shows the answer in `#ws`;
- `ws`: a websocket answering every message with "<user> got <message>";
- anything else: JSON naming whose server this is (and `X-JupyterHub-Version`, which the hub
  reads when it checks that the server is up).
It writes its pid to HUBGATE_PY_WORKDIR/pids/ so that the test can stop servers a hub left.
"""

import json
import os
from importlib.metadata import version
from urllib.parse import unquote, urlsplit

from aiohttp import WSMsgType, web

USER = os.environ["JUPYTERHUB_USER"]
# aiohttp routes on the decoded path; the hub gives the prefix URL-encoded.
PREFIX = unquote(os.environ["JUPYTERHUB_SERVICE_PREFIX"])
HUB_VERSION = version("jupyterhub")

PAGE = """<!doctype html>
<html><head><title>server of {user}</title></head>
<body><h1 id="owner">server of {user}</h1><p id="ws">connecting</p>
<script>
const ws = new WebSocket(location.href.replace(/^http/, "ws").replace(/page$/, "ws"));
ws.onopen = () => ws.send("ping");
ws.onmessage = (m) => {{ document.getElementById("ws").textContent = m.data; }};
ws.onerror = () => {{ document.getElementById("ws").textContent = "websocket error"; }};
ws.onclose = (e) => {{
  const p = document.getElementById("ws");
  if (p.textContent === "connecting") p.textContent = "websocket closed " + e.code;
}};
</script></body></html>
"""


async def page(request):
    return web.Response(text=PAGE.format(user=USER), content_type="text/html")


async def socket(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(f"{USER} got {msg.data}")
    return ws


async def anything(request):
    body = {"server_of": USER, "path": request.path}
    return web.Response(
        text=json.dumps(body),
        content_type="application/json",
        headers={"X-JupyterHub-Version": HUB_VERSION},
    )


def main():
    pids = os.path.join(os.environ["HUBGATE_PY_WORKDIR"], "pids")
    os.makedirs(pids, exist_ok=True)
    with open(os.path.join(pids, f"{USER}.pid"), "w") as f:
        f.write(str(os.getpid()))
    app = web.Application()
    app.router.add_get(PREFIX + "page", page)
    app.router.add_get(PREFIX + "ws", socket)
    app.router.add_route("*", "/{tail:.*}", anything)
    url = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    web.run_app(app, host=url.hostname, port=url.port, print=None)


if __name__ == "__main__":
    main()
