"""The hub's reconcile through HubgateProxy is one batch, however many routes are missing.

The hub starts with 1 000 users whose servers run (written into its database beforehand; every
server is one shared backend). Once hubgate routes them all, the test empties hubgate's table of
user routes (one `POST /api/proxy` sync) and asks the hub to reconcile (`POST /hub/api/proxy`):
its `check_routes` finds 1 000 routes missing. With JupyterHub's own class that is 1 000
`POST /api/routes` calls; here hubgate's own counters must show that this reconcile sent one
`PATCH /api/proxy` carrying them all and no single-route call (nor did the start-up).
"""

import aiohttp
from hubtest import (
    Hub,
    add_running_servers,
    drop_user_routes,
    eventually,
    free_ports,
    metric,
    reconcile_now,
    start_backend,
    user_route_count,
)

USERS = 1000
OPS = "hubgate_api_operations_total"
SIZES = "hubgate_route_change_size"


def counts(samples):
    """Route API calls so far, and how many batches carried more than 100 changes."""
    small = metric(samples, SIZES + "_bucket", op="batch", le="100")
    return {
        "route_add": metric(samples, OPS, op="route_add"),
        "route_delete": metric(samples, OPS, op="route_delete"),
        "batch": metric(samples, OPS, op="batch"),
        "big_batch": metric(samples, SIZES + "_count", op="batch") - small,
    }


async def test_a_thousand_missing_routes_are_one_batch(tmp_path):
    (backend_port,) = free_ports(1)
    names = [f"user{i:04}" for i in range(USERS)]
    add_running_servers(tmp_path / "hub", names, backend_port)
    backend = start_backend(tmp_path, backend_port)
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
            # A thousand users make the hub take half a minute to start on a quiet machine.
            await hub.wait_up(session, patience=300)

            async def complete():
                routes = await hub.proxy_routes(session)
                assert user_route_count(routes) == USERS, f"{user_route_count(routes)} so far"
                return routes

            # The hub checks every server at start, concurrently with its first reconciles.
            routes = await eventually(
                "hubgate has every user's route", complete, patience=180, hub=hub
            )
            assert routes[f"/@/space word/user/{names[7]}"]["target"] == (
                f"http://127.0.0.1:{backend_port}"
            )

            # A fresh hubgate asks the hub for a reconcile of its own (its start-up handshake).
            # On a busy machine it can come after the table is complete: counted from here, or
            # run after the routes are dropped below, it would be a second batch.
            async def handshake_over():
                assert "/hub/api/proxy (hubgate@" in hub.log_text(), "no handshake yet"

            await eventually("hubgate's handshake with the hub", handshake_over, hub=hub)
            started = counts(await hub.hubgate_metrics(session))
            assert started["route_add"] == 0, "the start-up added a route by itself"

            assert await drop_user_routes(hub, session) == USERS
            await reconcile_now(hub, session)
            routes = await hub.proxy_routes(session)
            assert user_route_count(routes) == USERS, "the reconcile did not restore every route"
            after = counts(await hub.hubgate_metrics(session))
        sent = {k: after[k] - started[k] for k in after}
        assert sent == {"route_add": 0, "route_delete": 0, "batch": 1, "big_batch": 1}, sent
        assert f"Sending hubgate one batch: {USERS} routes to add" in hub.log_text()
    finally:
        hub.close()
        backend.kill()
        backend.wait()
