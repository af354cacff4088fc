//! Black-box integration tests for hubgate.
//!
//! Every test starts the real `hubgate` binary on `127.0.0.1:0` and talks to it over TCP, with
//! backends (echo servers, websocket peers, streaming servers) running in-process. One test binary
//! with modules builds faster than one binary per file.
//!
//! - `support`: the harness (starting hubgate, backends, HTTP helpers, `eventually`).
//! - `api`: the REST API on the API address.
//! - `proxy`: routing, forwarding, headers and error pages on the public address.
//! - `cli`: command-line parsing, version, configuration errors, and the documented options.
//! - `docs`: the README's contributor map against `src/lib.rs`.
//! - `websocket`: websocket upgrades through the proxy.
//! - `streaming`: large and incremental bodies pass through without buffering.
//! - `abuse`: hostile clients: smuggling, bad headers, size limits, HTTP/2 resets, floods.
//! - `faults`: failing targets, hub and route store, and recovery once the fault is gone.
//! - `openapi`: the OpenAPI document against the router, the example client, schemathesis findings.
//! - `workers`: the data plane's workers: spread, one connection limit, drain, reload, h2, ws.
//! - `limits_fair`: fair-use limits per user and per client address, the login bucket, reloads.

mod support;

mod abuse;
mod api;
mod auth;
mod certs;
mod cli;
mod docs;
mod durability;
mod fakehub;
mod faults;
mod handshake;
mod jhub;
mod jupyterhub;
mod jupyterhub_auth;
mod jupyterhub_restart;
mod jupyterhub_ssl;
mod layers;
mod lifecycle;
mod limits;
mod limits_fair;
mod metrics;
mod metrics_support;
mod model;
mod openapi;
mod proxy;
mod redis;
mod redis_cluster;
mod redis_failover;
mod streaming;
mod sync;
mod tls;
mod websocket;
mod workers;
