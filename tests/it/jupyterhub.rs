//! End to end: a real JupyterHub 6 starts hubgate as its proxy and drives it.
//!
//! This is the drop-in promise tested the way an operator would rely on it: JupyterHub is told
//! only that its `ConfigurableHTTPProxy.command` is hubgate. The hub starts it with CHP's flags
//! and `CONFIGPROXY_AUTH_TOKEN`, adds its own route and a user's route through `/api/routes`,
//! reconciles the table every 2 s, and restarts hubgate when it dies. The scenario: the hub
//! answers through hubgate; alice's server, started through the hub's REST API, answers through
//! hubgate; both tables (hubgate's `/api/routes`, the hub's `/hub/api/proxy`) agree; hubgate is
//! SIGKILLed and the hub's new one serves alice again; stopping alice's server removes her route;
//! and the hub's log never shows it repairing the table.
//!
//! The test sets up what it needs by itself (the venv and the hub process: see [`crate::jhub`]).
//! The single-user server is `tests/e2e/singleuser.py`, a stdlib HTTP server that answers with
//! the user's name; the hub's configuration is `tests/e2e/jupyterhub_config.py`. The base URL is
//! `/@/space%20word/`, as in JupyterHub's own tests, so a proxy that stores or lists route keys
//! in the wrong encoding shows up as a missing route or as route churn in the hub's log.
//!
//! Set `HUBGATE_E2E_PROXY_COMMAND` to another proxy executable (configurable-http-proxy) to run
//! the same scenario against it.
//!
//! Linux only: it reads `/proc/<pid>/cmdline` to make sure it kills the proxy, nothing else.
#![cfg(target_os = "linux")]

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use hyper::header::LOCATION;
use hyper::StatusCode;
use serde_json::Value;

use crate::jhub::{
    alice_answers, eventually, hub_answers, hub_reconciles_again, hubgate_binary, proxy_routes,
    signal, start_server, stop_server, text, venv, Http, Hub, HubSpec, Ports, ADMIN_TOKEN,
    BASE_KEY, BASE_URL,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyterhub_runs_on_hubgate_and_restarts_it() {
    let venv = tokio::task::spawn_blocking(venv)
        .await
        .expect("venv setup panicked");
    let proxy_command = std::env::var_os("HUBGATE_E2E_PROXY_COMMAND")
        .map(PathBuf::from)
        .unwrap_or_else(hubgate_binary);
    let spec = Ports::free().map(|ports| HubSpec {
        config: "jupyterhub_config.py",
        proxy_command,
        ports,
        env: Vec::new(),
    });
    let hub = spec
        .and_then(|spec| Hub::start(venv, spec))
        .unwrap_or_else(|e| panic!("starting JupyterHub failed: {e:#}"));
    if let Err(e) = scenario(&hub).await {
        panic!(
            "{e:#}\n\n----- JupyterHub log (hubgate logs to the same stream) -----\n{}",
            hub.log_tail(400)
        );
    }
}

async fn scenario(hub: &Hub) -> Result<()> {
    let http = Http::new();

    let version = hub_answers(&http, hub).await?;
    eprintln!(
        "JupyterHub {version} is up behind {}",
        hub.proxy_command.display()
    );
    start_server(&http, hub, "alice").await?;

    eventually(hub, "alice's server answers through hubgate", || {
        alice_answers(&http, hub)
    })
    .await?;
    check_proxy_routes(&http, hub).await?;
    check_hub_view(&http, hub, true).await?;

    // Kill hubgate the hard way: the hub must notice, start a new one and re-add every route.
    let first = hub.proxy_pid()?;
    ensure!(
        hub.is_proxy(first),
        "pid {first} from the pid file is not {}",
        hub.proxy_command.display()
    );
    signal(first, "KILL")?;
    let second = eventually(hub, "the hub starts a new hubgate", || async {
        let pid = hub.proxy_pid()?;
        ensure!(
            pid != first,
            "pid file still names the killed proxy {first}"
        );
        ensure!(hub.is_proxy(pid), "pid {pid} is not (yet) the proxy");
        Ok(pid)
    })
    .await?;
    eprintln!("hub restarted the proxy: pid {first} -> {second}");
    eventually(
        hub,
        "alice's server answers through the new hubgate",
        || alice_answers(&http, hub),
    )
    .await?;
    check_proxy_routes(&http, hub).await?;

    // Let the hub reconcile its table against the new proxy at least once more (every 2 s).
    hub_reconciles_again(hub).await?;
    check_hub_view(&http, hub, true).await?;

    // Stopping the server: the hub DELETEs the route by its encoded key, and requests for alice
    // fall through to the hub's route, where the hub redirects them to its own pages.
    stop_server(&http, hub, "alice").await?;
    eventually(hub, "alice's route is gone from hubgate", || async {
        let alice_key = format!("{BASE_KEY}/user/alice");
        let routes = proxy_routes(&http, hub).await?;
        ensure!(
            !routes.contains_key(&alice_key),
            "hubgate still lists {alice_key:?}"
        );
        let url = hub.public_url("user/alice/some/path");
        let (status, headers, body) = http.get(&url, None).await?;
        let location = headers.get(LOCATION).and_then(|v| v.to_str().ok());
        let want = format!("{BASE_URL}hub/user/alice/some/path");
        ensure!(
            status == StatusCode::FOUND && location == Some(want.as_str()),
            "GET {url}: {status} Location {location:?} {}, want the hub's 302 to {want}",
            text(&body)
        );
        Ok(())
    })
    .await?;
    check_hub_view(&http, hub, false).await?;

    // The hub never had to repair the table: everything hubgate listed was what it added, and
    // every DELETE found its route.
    let log = hub.log();
    ensure!(
        log.contains("Proxy stopped with exit code -9"),
        "the hub never logged that the killed proxy stopped"
    );
    for churn in [
        "Deleting stale route",
        "Updating route",
        "Updating Hub route",
        "already deleted",
    ] {
        ensure!(
            !log.contains(churn),
            "`{churn}` in the hub's log: the table listed by GET /api/routes \
             differs from what the hub added, or a DELETE did not find its route"
        );
    }
    Ok(())
}

/// hubgate's own table lists the hub's and alice's routes under decoded keys with their data.
async fn check_proxy_routes(http: &Http, hub: &Hub) -> Result<()> {
    let routes = proxy_routes(http, hub).await?;
    let alice_key = format!("{BASE_KEY}/user/alice");
    let alice = routes
        .get(&alice_key)
        .with_context(|| format!("no route {alice_key:?} in {}", Value::from(routes.clone())))?;
    ensure!(
        alice["user"] == "alice"
            && alice["server_name"] == ""
            && alice["jupyterhub"] == true
            && alice["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("http://127.0.0.1:"))
            && alice["last_activity"].is_string(),
        "route {alice_key:?} has the wrong data: {alice}"
    );
    let hub_route = routes.get(BASE_KEY).with_context(|| {
        format!(
            "no hub route {BASE_KEY:?} in {}",
            Value::from(routes.clone())
        )
    })?;
    let hub_target = format!("http://127.0.0.1:{}", hub.hub_port);
    ensure!(
        hub_route["hub"] == true
            && hub_route["jupyterhub"] == true
            && hub_route["target"] == hub_target.as_str(),
        "hub route has the wrong data: {hub_route}"
    );
    Ok(())
}

/// The table as the hub sees it (`GET /hub/api/proxy`): it re-quotes every key it reads from
/// the proxy, so only decoded keys come back as the routes it added. Alice's route is there
/// while her server runs.
async fn check_hub_view(http: &Http, hub: &Hub, with_alice: bool) -> Result<()> {
    let url = hub.public_url("hub/api/proxy");
    let (status, _, body) = http.get(&url, Some(ADMIN_TOKEN)).await?;
    ensure!(
        status == StatusCode::OK,
        "GET {url}: {status} {}",
        text(&body)
    );
    let view: Value = serde_json::from_slice(&body).context("hub/api/proxy: not JSON")?;
    let view = view.as_object().context("hub/api/proxy: not an object")?;
    let keys: Vec<&String> = view.keys().collect();
    let alice = format!("{BASE_URL}user/alice/");
    ensure!(
        view.contains_key(BASE_URL) && view.contains_key(&alice) == with_alice,
        "the hub sees {keys:?}, want {BASE_URL:?}{}",
        if with_alice {
            format!(" and {alice:?}")
        } else {
            " only".into()
        }
    );
    ensure!(
        keys.iter().all(|k| !k.contains("%25")),
        "the hub sees doubly encoded keys {keys:?}"
    );
    Ok(())
}
