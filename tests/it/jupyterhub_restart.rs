//! End to end: a real JupyterHub 6 keeps its routes in a hubgate that restarts on its own.
//!
//! Here the hub does not start its proxy (`ConfigurableHTTPProxy.should_start = False`, as when
//! the proxy runs in a container of its own): the test starts hubgate, the hub only talks to its
//! API, and nothing restarts hubgate or re-adds routes when it dies. hubgate knows the hub
//! (`--hub-api-url`) and holds a service token with the `proxy` scope (`JUPYTERHUB_API_TOKEN`).
//! The hub reconciles on its own only every 300 s (`last_activity_interval`), so within the test
//! the only thing that can bring routes back is hubgate itself. The scenario, once per store:
//! the hub answers through hubgate, alice's server answers through hubgate, hubgate is SIGKILLed
//! and a new one is started with the same flags and ports; the hub is neither restarted nor
//! called by the test after that.
//!
//! - Memory store (CHP's behaviour): the new hubgate starts empty and cannot vouch for its table,
//!   so its start-up handshake (`POST /hub/api/proxy`) makes the hub reconcile: alice's route is
//!   back within 30 s. Checked without timing: hubgate logged an empty, untrusted table at start;
//!   every route check the hub made after the kill was one hubgate asked for, and in it the hub
//!   found alice's route missing and added it; hubgate logged the handshake as done.
//! - File store: the new hubgate loads the table it wrote before the kill, which the hub had
//!   synced (the first hubgate's handshake), and trusts it, so it serves alice at once, with no
//!   handshake: no `POST /hub/api/proxy` reaches the hub, which still drives the restarted
//!   hubgate as before (stopping alice's server removes her route).
//!
//! Authentication at the edge is off here (`--auth-mode off`): these tests are about the route
//! table; `jupyterhub_auth` covers authentication. Hub configuration:
//! `tests/e2e/jupyterhub_restart_config.py`.
#![cfg(target_os = "linux")]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::jhub::{
    alice_answers, eventually, eventually_within, hub_answers, hubgate_binary, proxy_routes,
    start_server, stop_server, tail, venv, Http, Hub, HubSpec, Ports, BASE_KEY, BASE_URL,
    PROXY_TOKEN,
};

/// Token of the `hubgate` service (scope `proxy`): hubgate's `JUPYTERHUB_API_TOKEN`.
const HUBGATE_TOKEN: &str = "e2e-hubgate-token-0123456789";
/// How long a restarted hubgate with the memory store may take to get alice's route back.
const RECOVERY: Duration = Duration::from_secs(30);
/// How long hubgate may take to listen after it was started.
const STARTUP: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    Memory,
    File,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyterhub_resyncs_a_restarted_hubgate_through_its_handshake() {
    restart_scenario(Storage::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyterhub_routes_survive_a_hubgate_restart_with_the_file_store() {
    restart_scenario(Storage::File).await;
}

async fn restart_scenario(storage: Storage) {
    let venv = tokio::task::spawn_blocking(venv)
        .await
        .expect("venv setup panicked");
    let mut setup = match Setup::start(venv, storage).await {
        Ok(setup) => setup,
        Err(e) => panic!("starting hubgate and JupyterHub failed: {e:#}"),
    };
    let outcome = match storage {
        Storage::Memory => memory_store(&mut setup).await,
        Storage::File => file_store(&mut setup).await,
    };
    if let Err(e) = outcome {
        panic!("{e:#}\n\n{}", setup.logs());
    }
}

/// A hub whose proxy is the hubgate the test started last.
struct Setup {
    // Dropped first, while its proxy still answers: the hub stops alice's server on the way out
    // and deletes her route, and would retry for half a minute against a dead proxy.
    hub: Hub,
    hubgates: Vec<Hubgate>,
    ports: Ports,
    dir: tempfile::TempDir,
    /// Flags on top of the listeners, hub URL and `--auth-mode off`.
    extra: Vec<String>,
    /// The file store's directory, when that is the store.
    store: Option<PathBuf>,
}

impl Setup {
    /// Starts hubgate, then the hub (which checks its proxy's API before it listens).
    async fn start(venv: &Path, storage: Storage) -> Result<Self> {
        let ports = Ports::free()?;
        let dir = tempfile::Builder::new()
            .prefix("e2e-hubgate-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .context("creating hubgate's working directory")?;
        let store = (storage == Storage::File).then(|| dir.path().join("store"));
        let extra = match &store {
            None => Vec::new(),
            Some(store) => vec![
                "--storage-backend".to_owned(),
                "file".to_owned(),
                "--storage-path".to_owned(),
                store.display().to_string(),
            ],
        };
        let first = Hubgate::start(dir.path(), 1, ports, &extra)?;
        first.listening().await?;
        let hub = Hub::start(
            venv,
            HubSpec {
                config: "jupyterhub_restart_config.py",
                proxy_command: hubgate_binary(),
                ports,
                env: vec![("HUBGATE_E2E_HUBGATE_TOKEN", HUBGATE_TOKEN.into())],
            },
        )?;
        Ok(Setup {
            hubgates: vec![first],
            hub,
            ports,
            dir,
            extra,
            store,
        })
    }

    fn current(&self) -> &Hubgate {
        self.hubgates.last().expect("a hubgate was started")
    }

    /// The first part of both scenarios: alice's server answers through the first hubgate, which
    /// has finished its own start-up handshake (so no call of it is still on its way to the hub)
    /// and, with the file store, recorded that the hub synced its table: only a table the hub
    /// synced is trusted at the next start; hubgate logs that record after the handshake.
    async fn alice_up(&self, http: &Http) -> Result<()> {
        hub_answers(http, &self.hub).await?;
        start_server(http, &self.hub, "alice").await?;
        eventually(&self.hub, "alice's server answers through hubgate", || {
            alice_answers(http, &self.hub)
        })
        .await?;
        eventually(
            &self.hub,
            "the first hubgate's handshake is done",
            || async {
                ensure!(
                    self.current().log().contains("hub handshake done"),
                    "no `hub handshake done` in the first hubgate's log yet"
                );
                Ok(())
            },
        )
        .await?;
        if self.store.is_some() {
            eventually(
                &self.hub,
                "the file store records the hub's sync",
                || async {
                    ensure!(
                        self.current()
                            .log()
                            .contains("store marked as synced by the hub"),
                        "no `store marked as synced by the hub` in the first hubgate's log yet"
                    );
                    Ok(())
                },
            )
            .await?;
        }
        Ok(())
    }

    /// SIGKILLs the running hubgate and starts the next one with the same flags and ports.
    /// Returns where the hub's log stood at the kill.
    async fn kill_and_restart(&mut self) -> Result<usize> {
        let marker = self.hub.log_offset();
        let number = self.hubgates.len() + 1;
        self.hubgates
            .last_mut()
            .expect("a hubgate was started")
            .kill()?;
        let next = Hubgate::start(self.dir.path(), number, self.ports, &self.extra)?;
        self.hubgates.push(next);
        self.current().listening().await?;
        eprintln!("hubgate SIGKILLed and started again with the same flags");
        Ok(marker)
    }

    /// The `route table loaded ...` line the new hubgate logged at start.
    fn loaded_line(&self) -> Result<String> {
        self.current()
            .log()
            .lines()
            .find(|l| l.contains("route table loaded"))
            .map(str::to_owned)
            .context("the restarted hubgate logged no `route table loaded` line")
    }

    fn logs(&self) -> String {
        let mut out = format!("----- JupyterHub log -----\n{}\n", self.hub.log_tail(300));
        for hubgate in &self.hubgates {
            out.push_str(&format!(
                "----- hubgate {} log -----\n{}\n",
                hubgate.number,
                tail(&hubgate.log(), 100, &hubgate.log_path)
            ));
        }
        out
    }
}

/// Memory store: the restarted hubgate starts empty and gets alice's route back by making the
/// hub sync, which the hub would otherwise do only minutes later.
async fn memory_store(setup: &mut Setup) -> Result<()> {
    let http = Http::new();
    setup.alice_up(&http).await?;
    let marker = setup.kill_and_restart().await?;
    let hub = &setup.hub;

    let loaded = setup.loaded_line()?;
    ensure!(
        loaded.contains("routes=0") && loaded.contains("trusted=false"),
        "the restarted hubgate should start with an empty table it cannot vouch for: {loaded}"
    );

    eventually_within(
        hub,
        RECOVERY,
        "alice's route is back in the restarted hubgate",
        || alice_answers(&http, hub),
    )
    .await?;
    let routes = proxy_routes(&http, hub).await?;
    let alice_key = format!("{BASE_KEY}/user/alice");
    ensure!(
        routes.get(&alice_key).is_some_and(|r| r["user"] == "alice")
            && routes.get(BASE_KEY).is_some_and(|r| r["hub"] == true),
        "the restarted hubgate's table lacks the hub's or alice's route: {:?}",
        routes.keys().collect::<Vec<_>>()
    );
    eventually(hub, "the restarted hubgate logs its handshake", || async {
        ensure!(
            setup.current().log().contains("hub handshake done"),
            "no `hub handshake done` in the restarted hubgate's log"
        );
        Ok(())
    })
    .await?;

    // What the hub did after the kill, from its log: it reconciled only when hubgate asked
    // (`POST /hub/api/proxy` with hubgate's token), and that reconcile is where alice's missing
    // route was re-added.
    let sync = format!("POST {BASE_URL}hub/api/proxy (hubgate@");
    let synced = format!("200 {sync}");
    let after = eventually(hub, "the hub logs hubgate's sync request", || async {
        let after = hub.log_since(marker);
        ensure!(
            after.contains(&synced),
            "no `{synced}` in the hub's log since the kill"
        );
        Ok(after)
    })
    .await?;
    let lines: Vec<&str> = after.lines().collect();
    let syncs = positions(&lines, |l| l.contains(&sync));
    let first_synced = positions(&lines, |l| l.contains(&synced))[0];
    let checks = positions(&lines, |l| l.contains("Checking routes"));
    let re_added = format!("Adding missing route for {BASE_URL}user/alice/");
    let added = positions(&lines, |l| l.contains(&re_added));
    ensure!(
        checks.len() <= syncs.len(),
        "after the kill the hub checked its routes {} times but was asked only {} times: \
         something other than hubgate's handshake made it reconcile",
        checks.len(),
        syncs.len()
    );
    ensure!(
        added.first().is_some_and(|&added| added < first_synced),
        "the hub's log since the kill should show `{re_added}` before it answered hubgate's \
         `POST /hub/api/proxy` (line {first_synced}); found it at lines {added:?}"
    );
    Ok(())
}

/// File store: the restarted hubgate loads the table it wrote and vouches for it, so alice is
/// served at once and the hub is not asked to sync.
async fn file_store(setup: &mut Setup) -> Result<()> {
    let http = Http::new();
    setup.alice_up(&http).await?;
    let marker = setup.kill_and_restart().await?;
    let hub = &setup.hub;

    let loaded = setup.loaded_line()?;
    ensure!(
        loaded.contains("trusted=true") && !loaded.contains("routes=0"),
        "the restarted hubgate should load its routes from the store and trust them: {loaded}"
    );
    // One attempt, no polling: the table was loaded before the public port opened.
    alice_answers(&http, hub)
        .await
        .context("alice's server, right after the restart")?;

    // The hub drives the restarted hubgate as before: stopping alice's server deletes her route
    // (by the key the hub added it under: a DELETE that finds nothing is logged by the hub).
    stop_server(&http, hub, "alice").await?;
    eventually(hub, "alice's route is gone from hubgate", || async {
        let alice_key = format!("{BASE_KEY}/user/alice");
        let routes = proxy_routes(&http, hub).await?;
        ensure!(
            !routes.contains_key(&alice_key),
            "hubgate still lists {alice_key:?}"
        );
        Ok(())
    })
    .await?;

    let after = hub.log_since(marker);
    for unexpected in [
        "hub/api/proxy",
        "Checking routes",
        "already deleted",
        "Adding missing route",
    ] {
        ensure!(
            !after.contains(unexpected),
            "`{unexpected}` in the hub's log since the kill: the restarted hubgate, which \
             trusts its stored table, made the hub sync or lost a route"
        );
    }
    ensure!(
        !setup.current().log().contains("handshake"),
        "the restarted hubgate tried a handshake although it trusts its table"
    );
    Ok(())
}

fn positions(lines: &[&str], matches: impl Fn(&str) -> bool) -> Vec<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| matches(l))
        .map(|(i, _)| i)
        .collect()
}

/// A hubgate started by the test on fixed ports, logging to a file; SIGKILLed on drop.
struct Hubgate {
    number: usize,
    child: Child,
    log_path: PathBuf,
}

impl Hubgate {
    fn start(dir: &Path, number: usize, ports: Ports, extra: &[String]) -> Result<Self> {
        let log_path = dir.join(format!("hubgate-{number}.log"));
        let log = fs::File::create(&log_path).context("creating hubgate's log file")?;
        let child = Command::new(hubgate_binary())
            .args(["--ip", "127.0.0.1", "--port"])
            .arg(ports.public.to_string())
            .args(["--api-ip", "127.0.0.1", "--api-port"])
            .arg(ports.api.to_string())
            .arg("--hub-api-url")
            .arg(ports.hub_api_url())
            .args(["--auth-mode", "off"])
            .args(extra)
            .env("CONFIGPROXY_AUTH_TOKEN", PROXY_TOKEN)
            .env("JUPYTERHUB_API_TOKEN", HUBGATE_TOKEN)
            .env_remove("JUPYTERHUB_API_URL")
            .env_remove("JUPYTERHUB_CLIENT_ID")
            .env_remove("JUPYTERHUB_OAUTH_CALLBACK_URL")
            .env_remove("HUBGATE_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning hubgate")?;
        Ok(Hubgate {
            number,
            child,
            log_path,
        })
    }

    /// Waits until hubgate has logged both listeners (its table is loaded before that).
    async fn listening(&self) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let log = self.log();
            let up = |which: &str| {
                log.lines()
                    .any(|l| l.contains("listening") && l.contains(&format!("listener={which}")))
            };
            if up("proxy") && up("api") {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "hubgate {} did not listen within {STARTUP:?}",
                self.number
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and wait until the process is gone (its ports and store lock are free then).
    fn kill(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("hubgate {} had already exited with {status}", self.number);
        }
        self.child.kill().context("SIGKILL hubgate")?;
        self.child.wait().context("reaping hubgate")?;
        Ok(())
    }

    fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Hubgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
