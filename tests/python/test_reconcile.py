"""The hub's reconcile through HubgateProxy is one batch, however many routes are missing.

The hub starts with 1 000 users whose servers run (written into its database beforehand; every
server is one shared backend) and a new, empty hubgate: its start-up `check_routes` finds all
1 000 routes missing. With JupyterHub's own class that is 1 000 `POST /api/routes` calls; here
hubgate's own counters must show one `PATCH /api/proxy` that carried them all, and no
single-route call.
"""

import aiohttp
from hubtest import (
    BASE_URL,
    Hub,
    add_running_servers,
    eventually,
    free_ports,
    metric,
    start_backend,
)

USERS = 1000


async def test_a_thousand_missing_routes_are_one_batch(tmp_path):
    (backend_port,) = free_ports(1)
    backend = start_backend(tmp_path, backend_port)
    names = [f"user{i:04}" for i in range(USERS)]
    add_running_servers(tmp_path / "hub", names, backend_port)
    hub = Hub(
        tmp_path / "hub",
        env={
            "HUBGATE_PY_SPAWNER": "shared",
            "HUBGATE_PY_BACKEND_PORT": str(backend_port),
            # Stopping a thousand servers at the end would take the hub half a minute.
            "HUBGATE_PY_KEEP_RUNNING": "1",
        },
    )
    try:
        hub.start()
        async with aiohttp.ClientSession() as session:
            await hub.wait_up(session)

            async def complete():
                routes = await hub.proxy_routes(session)
                users = [k for k, r in routes.items() if "user" in r]
                assert len(users) == USERS, f"{len(users)} user routes so far"
                return routes

            routes = await eventually("hubgate has every user's route", complete, hub=hub)
            assert routes[f"/@/space word/user/{names[7]}"]["target"] == (
                f"http://127.0.0.1:{backend_port}"
            )
            samples = await hub.hubgate_metrics(session)
        ops = "hubgate_api_operations_total"
        assert metric(samples, ops, op="route_add") == 0, "a route was added by itself"
        assert metric(samples, ops, op="route_delete") == 0
        batches = metric(samples, ops, op="batch")
        sizes = "hubgate_route_change_size"
        small = metric(samples, sizes + "_bucket", op="batch", le="100")
        big = metric(samples, sizes + "_count", op="batch") - small
        assert big == 1, f"{big} batches of more than 100 routes ({batches} batches in all)"
        assert batches <= 3, f"{batches} batches"
        assert f"Sending hubgate one batch: {USERS + 1} routes" in hub.log_text()
        assert f"{BASE_URL}user/{names[0]}/" in hub.log_text()
    finally:
        hub.close()
        backend.kill()
        backend.wait()
