//! The Redis store: one route table shared by several hubgate replicas.
//!
//! What lives in Redis (every key under one hash tag, `{prefix}`, so that a Redis Cluster would
//! keep them in one slot, as Lua scripts need):
//! - `{p}:routes`: a hash of route key → the posted data, as JSON;
//! - `{p}:activity`: a hash of route key → `last_activity` in milliseconds, only ever raised;
//! - `{p}:version`: the table version, one more per batch, shared by every replica;
//! - `{p}:log`: a stream of what happened, in order: small batches in full, large ones as a
//!   `reload` marker, raised activity and revocations; trimmed to about [`LOG_LENGTH`] entries;
//! - `{p}:synced`: when the hub synced the table (milliseconds), `0` until it has.
//!
//! Every script keeps every key it names in existence (the hashes hold a placeholder field
//! `""`, written by every change): while a Redis Cluster moves the slot, Redis runs a script
//! only when all of its keys are on one node, and refuses (`TRYAGAIN`) one that names a key
//! that does not exist; a script that deleted the last route and then wrote one would even be
//! stopped halfway. So a change mid-migration runs whole, on the node that has the keys.
//!
//! Every write is a Lua script, so a batch is applied whole or not at all, and only if no change
//! since the version the writing replica computed it on touched its routes (optimistic
//! concurrency per route; a sync needs the table exactly at that version). A replica whose
//! batch conflicts gets [`StoreError::Conflict`]; the control plane catches up and tries again.
//! With `--redis-min-replicas N` a write is acknowledged only once `WAIT N` confirms it.
//!
//! The primary is one address (`--redis-url`), the one Sentinel names (asked again after every
//! lost connection or READONLY answer, so failovers are followed), or the primary of the keys'
//! slot in a Redis Cluster (the redis crate's cluster client). A primary with another
//! replication id than the one the table was read from (a failover, a restart) is
//! [`StoreError::Stale`]: the writer reads the table again before writing.
//!
//! Each replica reads the log from where it was ([`StoreEvent`]s to the control plane), so a
//! replica that lost its connection resumes from its last entry, and one that missed entries
//! (trimmed while it was away) reloads the whole table.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, Script, ServerErrorKind,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};

use super::{
    Batch, Landed, Loaded, Revocation, Store, StoreError, StoreEvent, StoreHealth, StoredChange,
    StoredRoute,
};

/// Where the Redis store is and how to reach it: `--redis-url`, `--redis-sentinel` or
/// `--redis-cluster` and the flags that go with them, `--redis-prefix`, `--redis-ca`,
/// `--redis-min-replicas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub server: RedisServer,
    pub prefix: String,
    pub ca: Option<PathBuf>,
    /// Replicas that must have a change (`WAIT`) before it is acknowledged; 0: do not wait.
    pub min_replicas: u32,
}

/// How the Redis primary is found. `Debug` hides the passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisServer {
    /// One address (`--redis-url`).
    Url(String),
    /// Asked of Sentinel, again after every lost connection (so a failover is followed).
    Sentinel(SentinelSettings),
    /// A Redis Cluster: the redis crate's cluster client finds the primary of the keys' slot
    /// and follows redirections and failovers.
    Cluster {
        /// Nodes to start from, as `(host, port)`.
        nodes: Vec<(String, u16)>,
        password: Option<String>,
    },
}

impl RedisServer {
    /// The flag that named this server, for error messages.
    pub fn flag(&self) -> &'static str {
        match self {
            RedisServer::Url(_) => "--redis-url",
            RedisServer::Sentinel(_) => "--redis-sentinel",
            RedisServer::Cluster { .. } => "--redis-cluster",
        }
    }
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisServer::Url(url) => f.debug_tuple("Url").field(&without_password(url)).finish(),
            RedisServer::Sentinel(s) => f.debug_tuple("Sentinel").field(s).finish(),
            RedisServer::Cluster { nodes, password } => f
                .debug_struct("Cluster")
                .field("nodes", nodes)
                .field("password", &password.as_ref().map(|_| "<hidden>"))
                .finish(),
        }
    }
}

/// `--redis-sentinel` and the flags that go with it. `Debug` hides the passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelSettings {
    /// Each sentinel as `(host, port)`.
    pub nodes: Vec<(String, u16)>,
    pub master: String,
    /// Of the Redis servers (primary and replicas).
    pub password: Option<String>,
    /// Of the sentinels.
    pub sentinel_password: Option<String>,
}

impl fmt::Debug for SentinelSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |p: &Option<String>| p.as_ref().map(|_| "<hidden>");
        f.debug_struct("SentinelSettings")
            .field("nodes", &self.nodes)
            .field("master", &self.master)
            .field("password", &hidden(&self.password))
            .field("sentinel_password", &hidden(&self.sentinel_password))
            .finish()
    }
}

/// A URL with whatever stands before `@` in its authority (a password, perhaps with a user
/// name) replaced by `<hidden>`.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<hidden>{}", &rest[at..]),
        None => url.to_owned(),
    }
}

type RedisResult<T> = Result<T, RedisError>;

/// About how many entries the log keeps (`XADD MAXLEN ~`). A replica away for longer than this
/// many changes reloads the whole table when it comes back.
pub const LOG_LENGTH: usize = 10_000;

/// Batches with more changes than this go into the log as a `reload` marker rather than in
/// full: the other replicas read the table instead, and the log stays small.
const LOG_BATCH_MAX: usize = 1_000;

/// How long one blocking read of the log waits for news before asking again.
const LOG_BLOCK: Duration = Duration::from_secs(1);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long asking the sentinels for the primary may take (each sentinel asked in turn).
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `WAIT` waits for `--redis-min-replicas` replicas to confirm a write. Replication on
/// a working network takes well under a millisecond; past this the write is answered as of
/// unknown outcome rather than held.
const WAIT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// How many versions back a write may have been computed and still be applied on top of the
/// changes that came between (when they touch other routes). Further behind, the writer catches
/// up first.
const BEHIND_MAX: u64 = 256;

/// Applies batches computed on the table at version `ARGV[1]`. When the table has moved on since,
/// the batches are still applied, after the changes that came between, if none of those touched
/// the same routes and none was a whole-table change (a sync, a reload marker); `ARGV[4] == '1'`
/// (a sync) asks for the table to be exactly at `ARGV[1]`. After the batches come the routes the
/// writer took as absent without changing them: a change to them between is a conflict too. The
/// log says what came between: each batch entry lists its changes. Answers
/// `{1, version applied on, {v, changes, ...}}` (what came between, oldest first, so the writer
/// need not wait for the log to bring it) or, on a conflict, `{0, version, {}}`. Before it
/// changes anything it writes the placeholders (see the module's doc), so no key it names can
/// vanish while it runs.
const COMMIT: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local base = tonumber(ARGV[1])
local newest_first = {}
if cur ~= base then
  if ARGV[4] == '1' or cur < base or cur - base > tonumber(ARGV[5]) then return {0, cur, {}} end
  local mine = {}
  local i = 6
  for _ = 1, tonumber(ARGV[3]) do
    local n = tonumber(ARGV[i + 1])
    i = i + 3
    for _ = 1, n do
      mine[ARGV[i + 1]] = true
      if ARGV[i] == 'p' then i = i + 4 else i = i + 2 end
    end
  end
  for j = i, #ARGV do mine[ARGV[j]] = true end
  local between, seen, last = cur - base, 0, '+'
  while seen < between do
    local entries = redis.call('XREVRANGE', KEYS[4], last, '-', 'COUNT', 64)
    if #entries == 0 then return {0, cur, {}} end
    for _, e in ipairs(entries) do
      local f = {}
      for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end
      if f.kind == 'batch' or f.kind == 'reload' then
        if f.kind == 'reload' or f.whole == '1' or tonumber(f.v) <= base then return {0, cur, {}} end
        for _, c in ipairs(cjson.decode(f.changes)) do
          if mine[c.key] then return {0, cur, {}} end
        end
        newest_first[#newest_first + 1] = f.changes
        seen = seen + 1
        if seen == between then break end
      end
      last = '(' .. e[1]
    end
  end
end
redis.call('HSETNX', KEYS[2], '', '')
redis.call('HSETNX', KEYS[3], '', '0')
redis.call('SETNX', KEYS[5], '0')
local came = {}
if cur ~= base then
  for n = cur - base, 1, -1 do
    came[#came + 1] = tostring(cur - n + 1)
    came[#came + 1] = newest_first[n]
  end
end
local i = 6
for b = 1, tonumber(ARGV[3]) do
  local v, payload, n = cur + b, ARGV[i], tonumber(ARGV[i + 1])
  local whole = ARGV[i + 2]
  i = i + 3
  for _ = 1, n do
    if ARGV[i] == 'p' then
      redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
      redis.call('HSET', KEYS[3], ARGV[i + 1], ARGV[i + 3])
      i = i + 4
    else
      redis.call('HDEL', KEYS[2], ARGV[i + 1])
      redis.call('HDEL', KEYS[3], ARGV[i + 1])
      i = i + 2
    end
  end
  redis.call('SET', KEYS[1], v)
  if payload == '' then
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'kind', 'reload', 'v', v)
  else
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'kind', 'batch', 'v', v, 'whole', whole, 'changes', payload)
  end
end
return {1, cur, came}
";

/// Raises `last_activity` of existing routes (the latest wins) and logs the values that rose.
const ACTIVITY: &str = r"
local raised = {}
for i = 2, #ARGV, 2 do
  local k, ms = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('HEXISTS', KEYS[1], k) == 1 then
    local old = tonumber(redis.call('HGET', KEYS[2], k) or '0')
    if ms > old then
      redis.call('HSET', KEYS[2], k, ARGV[i + 1])
      raised[#raised + 1] = k
      raised[#raised + 1] = ARGV[i + 1]
    end
  end
end
if #raised > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'kind', 'activity', 'raised', cjson.encode(raised))
end
return #raised / 2
";

/// Writes a whole table into a store that has none (the version key is missing).
const REFILL: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[2], '', '')
redis.call('HSET', KEYS[3], '', '0')
redis.call('SETNX', KEYS[5], '0')
for i = 3, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2])
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[1], '*', 'kind', 'reload', 'v', ARGV[2])
return 1
";

/// The whole table (with the placeholders), its version, when the hub synced it (`0`: not
/// yet), and the log's last entry id.
const LOAD: &str = r"
local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
local position = '0-0'
if #last > 0 then position = last[1][1] end
return {
  redis.call('GET', KEYS[1]) or '',
  redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3]),
  redis.call('GET', KEYS[4]) or '0',
  position,
}
";

struct Keys {
    routes: String,
    activity: String,
    version: String,
    log: String,
    synced: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let key = |name: &str| format!("{{{prefix}}}:{name}");
        Keys {
            routes: key("routes"),
            activity: key("activity"),
            version: key("version"),
            log: key("log"),
            synced: key("synced"),
        }
    }
}

/// Where connections go: one address, the primary that Sentinel names at the time, or a cluster.
enum Source {
    Direct(Client),
    /// The redis crate's cluster client: it sends each command to the primary of its key's slot
    /// and follows MOVED/ASK, slot migrations and failovers.
    Cluster(ClusterClient),
    /// Asked again for every new connection, so that after a failover (noticed as a lost
    /// connection or a READONLY answer) hubgate follows the new primary without a restart.
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master: String,
    },
}

/// A connection to the primary and that server's replication id (`master_replid`): a server
/// with another id than the one the table was loaded from (a replica promoted by a failover, a
/// restarted server) may lack changes this replica has seen, so its table is read again before
/// any write.
#[derive(Clone)]
struct Conn {
    conn: Link,
    replid: Arc<str>,
}

/// A connection to one server, or to a cluster (`slot`: the keys' slot, to which `INFO`, a
/// command without a key that must reach the keys' primary, is routed).
#[derive(Clone)]
enum Link {
    Single(MultiplexedConnection),
    Cluster { conn: ClusterConnection, slot: u16 },
}

impl Link {
    /// Runs a command without a key on the primary that holds the keys.
    async fn on_primary<T: redis::FromRedisValue>(&mut self, cmd: redis::Cmd) -> RedisResult<T> {
        match self {
            Link::Single(c) => cmd.query_async(c).await,
            Link::Cluster { conn, slot } => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(*slot, SlotAddr::Master),
                ));
                let value = conn.route_command(cmd, route).await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}

impl redis::aio::ConnectionLike for Link {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster { conn, .. } => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster { conn, .. } => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Cluster { conn, .. } => conn.get_db(),
        }
    }
}

/// What the store's handle and its log reader share.
struct Shared {
    source: Source,
    keys: Keys,
    /// `--redis-min-replicas`: replicas `WAIT` must count before a write is acknowledged.
    min_replicas: u32,
    /// The connection for commands, made again after a failure.
    conn: Mutex<Option<Conn>>,
    /// The replication id of the server the table was last loaded from.
    lineage: Mutex<Option<Arc<str>>>,
    /// One more each time the primary moved (Sentinel said so, or the command connection found
    /// its server demoted): the log reader then leaves that server too.
    moved: AtomicU64,
    reachable: AtomicBool,
    /// Why the store is unreachable (the last error), for readiness and `/api/status`.
    detail: Mutex<Option<String>>,
    /// Where the log reader starts: the log's last entry when the table was first loaded.
    start: Mutex<Option<String>>,
    loaded: Notify,
    commit: Script,
    activity: Script,
    refill: Script,
    load: Script,
}

/// Routes in Redis, shared by every replica with the same URL and prefix.
pub struct RedisStore {
    shared: Arc<Shared>,
    events: Mutex<Option<mpsc::Receiver<StoreEvent>>>,
}

impl RedisStore {
    /// Prepares the client (nothing is connected yet) and starts the log reader, which waits
    /// for the first load.
    ///
    /// # Errors
    /// When the URL cannot be used or the CA file cannot be read.
    pub fn open(settings: &RedisSettings) -> Result<RedisStore, StoreError> {
        let mut sentinels = None;
        let source = match &settings.server {
            RedisServer::Url(url) => Source::Direct(direct_client(url, settings)?),
            RedisServer::Sentinel(s) => {
                sentinels = Some((sentinel_nodes(s)?, s.master.clone()));
                Source::Sentinel {
                    client: tokio::sync::Mutex::new(sentinel_client(s)?),
                    master: s.master.clone(),
                }
            }
            RedisServer::Cluster { nodes, password } => {
                Source::Cluster(cluster_client(nodes, password.as_deref())?)
            }
        };
        let shared = Arc::new(Shared {
            source,
            keys: Keys::new(&settings.prefix),
            min_replicas: settings.min_replicas,
            conn: Mutex::new(None),
            lineage: Mutex::new(None),
            moved: AtomicU64::new(0),
            reachable: AtomicBool::new(false),
            detail: Mutex::new(Some("not connected yet".to_owned())),
            start: Mutex::new(None),
            loaded: Notify::new(),
            commit: Script::new(COMMIT),
            activity: Script::new(ACTIVITY),
            refill: Script::new(REFILL),
            load: Script::new(LOAD),
        });
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(read_log(shared.clone(), tx));
        if let Some((nodes, master)) = sentinels {
            tokio::spawn(follow_sentinels(shared.clone(), nodes, master));
        }
        Ok(RedisStore {
            shared,
            events: Mutex::new(Some(rx)),
        })
    }
}

/// The client of `--redis-url` (with `--redis-ca`'s authorities for `rediss://`).
fn direct_client(url: &str, settings: &RedisSettings) -> Result<Client, StoreError> {
    match &settings.ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::Unavailable(format!("--redis-ca {}: {e}", path.display()))
            })?;
            Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        None => Client::open(url),
    }
    .map_err(|e| StoreError::Unavailable(describe(&e)))
}

/// A client that asks the sentinels of `--redis-sentinel` (with their own password) for the
/// primary, and connects to it with `--redis-password`.
fn sentinel_client(s: &SentinelSettings) -> Result<SentinelClient, StoreError> {
    let nodes = sentinel_nodes(s)?;
    let mut server = RedisConnectionInfo::default();
    if let Some(password) = &s.password {
        server = server.set_password(password);
    }
    SentinelClient::build(
        nodes,
        s.master.clone(),
        Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(server)),
        SentinelServerType::Master,
    )
    .map_err(|e| StoreError::Unavailable(describe(&e)))
}

/// How to reach each sentinel (with their own password).
fn sentinel_nodes(s: &SentinelSettings) -> Result<Vec<ConnectionInfo>, StoreError> {
    let mut nodes = Vec::with_capacity(s.nodes.len());
    for (host, port) in &s.nodes {
        let mut info = ConnectionAddr::Tcp(host.clone(), *port)
            .into_connection_info()
            .map_err(|e| StoreError::Unavailable(describe(&e)))?;
        if let Some(password) = &s.sentinel_password {
            info = info.set_redis_settings(RedisConnectionInfo::default().set_password(password));
        }
        nodes.push(info);
    }
    Ok(nodes)
}

/// Listens for `+switch-master` on one sentinel after the other: when the sentinels move the
/// primary, the command connection and the log reader leave the old one at once. Waiting until
/// the old primary refuses writes is not enough: after a `SENTINEL FAILOVER` it stays a primary
/// for seconds, and what it takes meanwhile is dropped when it becomes a replica.
async fn follow_sentinels(shared: Arc<Shared>, nodes: Vec<ConnectionInfo>, master: String) {
    let mut subscribed_before = false;
    for info in nodes.iter().cycle() {
        let pubsub = match Client::open(info.clone()) {
            Ok(client) => tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()).await,
            Err(e) => Ok(Err(e)),
        };
        if let Ok(Ok(mut pubsub)) = pubsub {
            if pubsub.subscribe("+switch-master").await.is_ok() {
                if subscribed_before {
                    // A switch may have come while no sentinel was listened to.
                    shared.leave_primary();
                }
                subscribed_before = true;
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let payload: String = message.get_payload().unwrap_or_default();
                    if payload.split(' ').next() == Some(master.as_str()) {
                        tracing::warn!(switch = %payload, "Sentinel moved the Redis primary; following");
                        shared.leave_primary();
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A client for a cluster reached first through `nodes`.
fn cluster_client(
    nodes: &[(String, u16)],
    password: Option<&str>,
) -> Result<ClusterClient, StoreError> {
    let nodes: Vec<ConnectionAddr> = nodes
        .iter()
        .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port))
        .collect();
    let mut builder = ClusterClient::builder(nodes)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT);
    if let Some(password) = password {
        builder = builder.password(password);
    }
    builder
        .build()
        .map_err(|e| StoreError::Unavailable(describe(&e)))
}

impl Shared {
    /// A new connection to the primary (asking Sentinel which server that is now), checked with
    /// one plain command that also gives the server's replication id and role.
    async fn connect(&self, response_timeout: Duration) -> Result<Conn, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        let mut conn = match &self.source {
            Source::Direct(client) => Link::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ),
            Source::Cluster(client) => {
                let mut conn = client
                    .get_async_connection_with_config(
                        redis::cluster::ClusterConfig::new()
                            .set_connection_timeout(CONNECT_TIMEOUT)
                            .set_response_timeout(response_timeout),
                    )
                    .await?;
                let slot: u16 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(&self.keys.version)
                    .query_async(&mut conn)
                    .await?;
                Link::Cluster { conn, slot }
            }
            Source::Sentinel { client, master } => {
                // The sentinel client keeps its connections to the sentinels and needs `&mut`:
                // a tokio mutex, held across the lookup, makes concurrent lookups take turns.
                let asked = tokio::time::timeout(SENTINEL_TIMEOUT, async {
                    client.lock().await.async_get_client().await
                })
                .await;
                let primary = match asked {
                    Ok(Ok(primary)) => primary,
                    Ok(Err(e)) => {
                        return Err(RedisError::from((
                            ErrorKind::Io,
                            "the sentinels name no reachable primary",
                            format!("{master:?}: {}", describe(&e)),
                        )))
                    }
                    Err(_) => {
                        return Err(RedisError::from((
                            ErrorKind::Io,
                            "the sentinels did not answer",
                            format!("within {SENTINEL_TIMEOUT:?}"),
                        )))
                    }
                };
                Link::Single(
                    primary
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
        };
        // A server that wants a password it was not given accepts the connection and refuses
        // every command: find out with one plain command, so the reason is NOAUTH (a MULTI
        // refused that way makes the redis crate's connection task panic).
        let mut info_cmd = redis::cmd("INFO");
        info_cmd.arg("replication");
        let info: String = conn.on_primary(info_cmd).await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        if matches!(self.source, Source::Sentinel { .. }) && field("role") != "master" {
            // Sentinel named a server that has just been demoted: ask again later.
            return Err(RedisError::from((
                ErrorKind::Io,
                "the server Sentinel named is not a primary (a failover is under way)",
            )));
        }
        Ok(Conn {
            conn,
            replid: field("master_replid").into(),
        })
    }

    /// The command connection, connecting if there is none. Two tasks may both connect after
    /// a failure; the later one's connection is kept, and the other is dropped when done.
    async fn conn(&self) -> Result<Conn, StoreError> {
        if let Some(c) = lock(&self.conn).clone() {
            return Ok(c);
        }
        match self.connect(RESPONSE_TIMEOUT).await {
            Ok(c) => {
                *lock(&self.conn) = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                self.down(&e);
                Err(StoreError::Unavailable(describe(&e)))
            }
        }
    }

    /// Drops the command connection (the next command connects to the primary as it is now) and
    /// makes the log reader reconnect too.
    fn leave_primary(&self) {
        *lock(&self.conn) = None;
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    fn up(&self) {
        if !self.reachable.swap(true, Ordering::Relaxed) {
            tracing::info!("route store redis is reachable");
        }
        *lock(&self.detail) = None;
    }

    fn down(&self, e: &RedisError) {
        let why = describe(e);
        // The command connection most likely broke too (the log reader notices first): the next
        // command connects afresh rather than failing once on the dead one.
        *lock(&self.conn) = None;
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %why, "route store redis is unreachable");
        }
        *lock(&self.detail) = Some(why);
    }

    /// Runs a command with the shared connection, keeping track of reachability. A failure
    /// after the command may have been sent is [`StoreError::Indeterminate`] when it writes.
    /// With [`Access::Table`], a server of another lineage than the loaded table's is
    /// [`StoreError::Stale`] and nothing is sent. Answers the value and the server's
    /// replication id.
    async fn run<T, F, Fut>(&self, access: Access, f: F) -> Result<(T, Arc<str>), StoreError>
    where
        F: FnOnce(Link) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let Conn { conn, replid } = self.conn().await?;
        if access == Access::Table {
            if let Some(lineage) = lock(&self.lineage).clone() {
                if lineage != replid {
                    return Err(StoreError::Stale(
                        "the Redis primary is another server than the one the table was read from (a failover or a restart)".to_owned(),
                    ));
                }
            }
        }
        let e = match f(conn).await {
            Ok(v) => {
                self.up();
                return Ok((v, replid));
            }
            Err(e) => e,
        };
        Err(match classify(&e) {
            Failure::Lost => {
                *lock(&self.conn) = None;
                self.down(&e);
                if access == Access::Read {
                    StoreError::Unavailable(describe(&e))
                } else {
                    StoreError::Indeterminate(describe(&e))
                }
            }
            Failure::Demoted => {
                // Nothing was applied. Leave the server; the next connection asks Sentinel for
                // the new primary, and the log reader moves too.
                self.leave_primary();
                tracing::warn!("the Redis server answered READONLY (it is a replica now); reconnecting to the primary");
                StoreError::Unavailable(format!(
                    "the Redis server is a replica now (failover); nothing was applied: {}",
                    describe(&e)
                ))
            }
            Failure::Refused => StoreError::Refused(describe(&e)),
        })
    }
}

/// What a failed command says about Redis, for [`Shared::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The connection failed or timed out: Redis may be gone, and a command sent may have run.
    Lost,
    /// The server was demoted by a failover (READONLY): nothing was applied.
    Demoted,
    /// Redis answered, with an error or a reply hubgate cannot read: it is reachable, and
    /// asking again will not help.
    Refused,
}

fn classify(e: &RedisError) -> Failure {
    if e.kind() == ErrorKind::UnexpectedReturnType {
        Failure::Refused
    } else if e.is_io_error() || e.is_timeout() || e.is_unrecoverable_error() {
        Failure::Lost
    } else if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) {
        Failure::Demoted
    } else {
        Failure::Refused
    }
}

/// A reply as `T`. A reply of another type came from a Redis that answered, but not as hubgate
/// expects (another kind of value under `--redis-prefix`'s keys, a server that only looks like
/// Redis): a refusal, not a lost connection (the redis crate calls it a parse error, as it does
/// a garbled stream, which would leave the outcome unknown).
fn typed<T: redis::FromRedisValue>(reply: redis::Value) -> RedisResult<T> {
    redis::from_redis_value(reply).map_err(|e| {
        RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "Redis answered with a reply of an unexpected type (another kind of value under --redis-prefix's keys, or a server that is not a compatible Redis)",
            e.to_string(),
        ))
    })
}

/// What a command does, for [`Shared::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Reads: a failure is [`StoreError::Unavailable`].
    Read,
    /// Writes that do not depend on the table's content (activity, revocations, the synced mark).
    Write,
    /// Writes computed on this replica's table: refused on a server of another lineage.
    Table,
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn retries_load(&self) -> bool {
        true
    }

    fn events(&self) -> Option<mpsc::Receiver<StoreEvent>> {
        lock(&self.events).take()
    }

    fn health(&self) -> StoreHealth {
        StoreHealth {
            reachable: self.shared.reachable.load(Ordering::Relaxed),
            detail: lock(&self.shared.detail).clone(),
        }
    }

    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async move {
            let k = &self.shared.keys;
            type Reply = (
                String,
                HashMap<String, String>,
                HashMap<String, i64>,
                String,
                String,
            );
            // One script, so the table, its version and the log position agree. (Not MULTI:
            // redis 1.8's connection task panics when a server refuses the MULTI itself.)
            let ((version, routes, activity, synced, position), replid): (Reply, _) = self
                .shared
                .run(Access::Read, |mut c| async move {
                    self.shared
                        .load
                        .key(&k.version)
                        .key(&k.routes)
                        .key(&k.activity)
                        .key(&k.synced)
                        .key(&k.log)
                        .invoke_async::<redis::Value>(&mut c)
                        .await
                        .and_then(typed)
                })
                .await?;
            let version = if version.is_empty() {
                0
            } else {
                version.parse::<u64>().map_err(|_| {
                    StoreError::Corrupt(format!("{} is not a version: {version:?}", k.version))
                })?
            };
            let mut stored = Vec::with_capacity(routes.len());
            // The placeholder (see the module's doc) is no route.
            for (key, data) in routes.into_iter().filter(|(key, _)| !key.is_empty()) {
                match serde_json::from_str::<Map<String, Value>>(&data) {
                    Ok(data) => stored.push(StoredRoute {
                        last_activity: activity.get(&key).copied().unwrap_or(0),
                        key,
                        data,
                    }),
                    Err(e) => {
                        tracing::warn!(route = %key, error = %e, "route in redis is not a JSON object; skipped")
                    }
                }
            }
            *lock(&self.shared.lineage) = Some(replid);
            let first = lock(&self.shared.start).replace(position).is_none();
            if first {
                self.shared.loaded.notify_one();
            }
            Ok(Loaded {
                routes: stored,
                version,
                trusted: !synced.is_empty() && synced != "0",
            })
        })
    }

    fn current_version(&self) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let key = &self.shared.keys.version;
            let (version, _): (Option<u64>, _) = self
                .shared
                .run(Access::Table, |mut c| async move {
                    redis::cmd("GET")
                        .arg(key)
                        .query_async::<redis::Value>(&mut c)
                        .await
                        .and_then(typed)
                })
                .await?;
            Ok(Some(version.unwrap_or(0)))
        })
    }

    fn write(&self, batches: Vec<Batch>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.write_routes(batches, true, Vec::new()).await.map(drop) })
    }

    fn write_routes(
        &self,
        batches: Vec<Batch>,
        whole_table: bool,
        absent: Vec<String>,
    ) -> BoxFuture<'_, Result<Landed, StoreError>> {
        Box::pin(async move {
            let Some(first) = batches.first() else {
                return Ok(Landed {
                    on: 0,
                    between: Vec::new(),
                });
            };
            let base = first.version - 1;
            let k = &self.shared.keys;
            let mut invocation = self.shared.commit.prepare_invoke();
            invocation
                .key(&k.version)
                .key(&k.routes)
                .key(&k.activity)
                .key(&k.log)
                .key(&k.synced)
                .arg(base)
                .arg(LOG_LENGTH)
                .arg(batches.len())
                .arg(if whole_table { "1" } else { "0" })
                .arg(BEHIND_MAX);
            for batch in &batches {
                let payload = if batch.changes.len() <= LOG_BATCH_MAX {
                    serde_json::to_string(&batch.changes)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?
                } else {
                    String::new()
                };
                invocation
                    .arg(payload)
                    .arg(batch.changes.len())
                    .arg(if whole_table { "1" } else { "0" });
                for change in &batch.changes {
                    match change {
                        StoredChange::Put(r) => {
                            let data = serde_json::to_string(&r.data)
                                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                            invocation
                                .arg("p")
                                .arg(&r.key)
                                .arg(data)
                                .arg(r.last_activity);
                        }
                        StoredChange::Del { key } => {
                            invocation.arg("d").arg(key);
                        }
                    }
                }
            }
            for key in &absent {
                invocation.arg(key);
            }
            let min_replicas = self.shared.min_replicas;
            let ((applied, current, came, confirmed), _) = self
                .shared
                .run(Access::Table, |mut c| async move {
                    let (applied, current, came): (i64, u64, Vec<String>) = invocation
                        .invoke_async::<redis::Value>(&mut c)
                        .await
                        .and_then(typed)?;
                    // WAIT counts the writes of the connection it is sent on: this one. In a
                    // cluster it goes to every primary and the least count stands (Redis's own
                    // routing for WAIT): while the slot migrates, the script may have run on
                    // the importing node after an ASK redirection, not on the one the client's
                    // slot map names, and a WAIT there alone would count nothing of it.
                    let confirmed = if applied == 1 && min_replicas > 0 {
                        redis::cmd("WAIT")
                            .arg(min_replicas)
                            .arg(WAIT_TIMEOUT.as_millis() as u64)
                            .query_async::<redis::Value>(&mut c)
                            .await
                            .and_then(typed)?
                    } else {
                        min_replicas
                    };
                    Ok((applied, current, came, confirmed))
                })
                .await?;
            if applied != 1 {
                return Err(StoreError::Conflict { current });
            }
            // `current` is the version the batches were applied on: `base`, or later when other
            // replicas changed other routes meanwhile.
            if confirmed < min_replicas {
                return Err(StoreError::Indeterminate(format!(
                    "only {confirmed} of the {min_replicas} Redis replicas required (--redis-min-replicas) confirmed the change within {WAIT_TIMEOUT:?}: it is on the primary, but a failover could lose it; the outcome is unknown, retry"
                )));
            }
            // What came between, as the log has it; a batch that cannot be read leaves the
            // list empty, and the writer waits for the log reader instead.
            let between = came
                .chunks_exact(2)
                .map(|vc| {
                    Some(Batch {
                        version: vc[0].parse().ok()?,
                        changes: serde_json::from_str(&vc[1]).ok()?,
                    })
                })
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default();
            Ok(Landed {
                on: current,
                between,
            })
        })
    }

    fn write_activity(
        &self,
        activity: HashMap<String, i64>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let k = &self.shared.keys;
            let mut invocation = self.shared.activity.prepare_invoke();
            invocation
                .key(&k.routes)
                .key(&k.activity)
                .key(&k.log)
                .arg(LOG_LENGTH);
            for (key, ms) in &activity {
                invocation.arg(key).arg(*ms);
            }
            let (_raised, _): (i64, _) = self
                .shared
                .run(Access::Write, |mut c| async move {
                    invocation
                        .invoke_async::<redis::Value>(&mut c)
                        .await
                        .and_then(typed)
                })
                .await?;
            Ok(())
        })
    }

    fn mark_synced(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let key = &self.shared.keys.synced;
            self.shared
                .run(Access::Write, |mut c| async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(crate::routes::now_ms())
                        .query_async::<redis::Value>(&mut c)
                        .await
                        .and_then(typed::<()>)
                })
                .await
                .map(drop)
        })
    }

    fn publish_revocation(&self, revocation: Revocation) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let log = &self.shared.keys.log;
            let body = serde_json::to_string(&revocation)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.shared
                .run(Access::Write, |mut c| async move {
                    redis::cmd("XADD")
                        .arg(log)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(LOG_LENGTH)
                        .arg("*")
                        .arg("kind")
                        .arg("revoke")
                        .arg("revocation")
                        .arg(body)
                        .query_async::<redis::Value>(&mut c)
                        .await
                        .and_then(typed::<String>)
                })
                .await
                .map(drop)
        })
    }

    fn refill(
        &self,
        routes: Vec<StoredRoute>,
        version: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let k = &self.shared.keys;
            let mut invocation = self.shared.refill.prepare_invoke();
            invocation
                .key(&k.version)
                .key(&k.routes)
                .key(&k.activity)
                .key(&k.log)
                .key(&k.synced)
                .arg(LOG_LENGTH)
                .arg(version);
            for r in &routes {
                let data = serde_json::to_string(&r.data)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                invocation.arg(&r.key).arg(data).arg(r.last_activity);
            }
            let (wrote, _): (i64, _) = self
                .shared
                .run(Access::Table, |mut c| async move {
                    invocation
                        .invoke_async::<redis::Value>(&mut c)
                        .await
                        .and_then(typed)
                })
                .await?;
            Ok(wrote == 1)
        })
    }
}

/// A log entry: its id and fields.
type Entry = (String, HashMap<String, String>);
/// What `XREAD` answers: per stream, its entries; nothing when the block timed out.
type Streams = Option<Vec<(String, Vec<Entry>)>>;

/// Follows the log from where the first load left it, on a connection of its own (a blocking
/// read would hold up commands on a shared one), and hands what it reads to the control plane.
async fn read_log(shared: Arc<Shared>, tx: mpsc::Sender<StoreEvent>) {
    let mut position = loop {
        if let Some(p) = lock(&shared.start).clone() {
            break p;
        }
        shared.loaded.notified().await;
    };
    let mut retry = Duration::from_millis(100);
    let mut reconnecting = false;
    loop {
        let moved = shared.moved.load(Ordering::Relaxed);
        let mut conn = match shared.connect(LOG_BLOCK + RESPONSE_TIMEOUT).await {
            Ok(c) => c.conn,
            Err(e) => {
                shared.down(&e);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        if reconnecting {
            match catch_up_check(&shared, &mut conn, &mut position).await {
                Ok(events) => {
                    for event in events {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    shared.down(&e);
                    tokio::time::sleep(retry).await;
                    continue;
                }
            }
        }
        reconnecting = true;
        retry = Duration::from_millis(100);
        loop {
            let read: Result<Streams, RedisError> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(512)
                .arg("BLOCK")
                .arg(LOG_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&shared.keys.log)
                .arg(&position)
                .query_async(&mut conn)
                .await;
            let streams = match read {
                Ok(s) => {
                    shared.up();
                    s.unwrap_or_default()
                }
                Err(e) => {
                    shared.down(&e);
                    break;
                }
            };
            for (_, entries) in streams {
                for (id, fields) in entries {
                    position = id;
                    if let Some(event) = event_of(&fields) {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if shared.moved.load(Ordering::Relaxed) != moved {
                // The command connection found this server demoted: follow it to the primary.
                break;
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// After a lost connection: the store's version (a store without one lost its data), and
/// whether this replica's place in the log is still there. When entries it had not read yet were
/// trimmed meanwhile, or the entry it read last is gone although the log goes on (a failover to
/// a replica that had not copied it), it must reload the table and read on from the log's end;
/// revocations may have been missed, so cached credentials are voided too.
async fn catch_up_check(
    shared: &Shared,
    conn: &mut Link,
    position: &mut String,
) -> Result<Vec<StoreEvent>, RedisError> {
    let log = &shared.keys.log;
    let (version, first, last, mine): (Option<u64>, Vec<Entry>, Vec<Entry>, Vec<Entry>) =
        redis::pipe()
            .cmd("GET")
            .arg(&shared.keys.version)
            .cmd("XRANGE")
            .arg(log)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XREVRANGE")
            .arg(log)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("XRANGE")
            .arg(log)
            .arg(position.as_str())
            .arg(position.as_str())
            .query_async(conn)
            .await?;
    let mut events = vec![StoreEvent::Reconnected { version }];
    let (Some((oldest, _)), Some((newest, _))) = (first.first(), last.first()) else {
        // An empty log: the store lost everything, which `Reconnected` handles (refill).
        return Ok(events);
    };
    let gone = if *position == "0-0" || !mine.is_empty() {
        None
    } else if stream_id_less(position, oldest) {
        Some("entries this replica had not read are gone from the route log (it was away too long, or redis lost its data)")
    } else {
        *position = newest.clone();
        Some("the route log entry this replica read last is gone (a failover to a replica that had not copied it)")
    };
    if let Some(why) = gone {
        tracing::warn!("{why}; reloading the table and voiding cached credentials");
        events.push(StoreEvent::Reload { version: None });
        events.push(StoreEvent::Revoke(Revocation {
            user: None,
            at_ms: crate::routes::now_ms(),
        }));
    }
    Ok(events)
}

/// Whether stream id `a` (`ms-seq`) comes before `b`.
fn stream_id_less(a: &str, b: &str) -> bool {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a) < parse(b)
}

/// One log entry as an event; an entry that cannot be read is logged and skipped, except a
/// batch, which becomes a reload (skipping it would leave this replica's table behind).
fn event_of(fields: &HashMap<String, String>) -> Option<StoreEvent> {
    let field = |name: &str| fields.get(name).map(String::as_str);
    match field("kind") {
        Some("batch") => {
            let parsed = field("v")
                .and_then(|v| v.parse::<u64>().ok())
                .zip(field("changes").and_then(|c| serde_json::from_str(c).ok()));
            Some(match parsed {
                Some((version, changes)) => StoreEvent::Batch(Batch { version, changes }),
                None => {
                    tracing::warn!("unreadable batch in the route log; reloading the table");
                    StoreEvent::Reload { version: None }
                }
            })
        }
        Some("reload") => Some(StoreEvent::Reload {
            version: field("v").and_then(|v| v.parse().ok()),
        }),
        Some("activity") => {
            let pairs: Vec<String> = field("raised")
                .and_then(|a| serde_json::from_str(a).ok())
                .unwrap_or_default();
            let raised = pairs
                .chunks_exact(2)
                .filter_map(|kv| Some((kv[0].clone(), kv[1].parse().ok()?)))
                .collect();
            Some(StoreEvent::Activity(raised))
        }
        Some("revoke") => match field("revocation").and_then(|r| serde_json::from_str(r).ok()) {
            Some(r) => Some(StoreEvent::Revoke(r)),
            None => {
                tracing::warn!(
                    "unreadable revocation in the route log; voiding every cached credential"
                );
                Some(StoreEvent::Revoke(Revocation {
                    user: None,
                    at_ms: crate::routes::now_ms(),
                }))
            }
        },
        other => {
            tracing::warn!(kind = ?other, "unknown entry in the route log; skipped");
            None
        }
    }
}

/// A Redis error in words, without the URL (which may hold a password).
fn describe(e: &RedisError) -> String {
    e.to_string()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_of_another_type_is_a_refusal_and_a_lost_connection_is_not() {
        let e = typed::<(i64, u64, Vec<String>)>(redis::Value::Okay).unwrap_err();
        assert_eq!(classify(&e), Failure::Refused);
        assert!(describe(&e).contains("unexpected type"), "{}", describe(&e));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&io), Failure::Lost);
        let demoted = RedisError::from((ErrorKind::Server(ServerErrorKind::ReadOnly), "READONLY"));
        assert_eq!(classify(&demoted), Failure::Demoted);
    }

    #[test]
    fn settings_print_no_password() {
        let printed = format!(
            "{:?} {:?} {:?}",
            RedisServer::Url("redis://:url-pw@h:6379".into()),
            RedisServer::Cluster {
                nodes: vec![("h".into(), 7000)],
                password: Some("cluster-pw".into()),
            },
            RedisServer::Sentinel(SentinelSettings {
                nodes: vec![("h".into(), 26379)],
                master: "hub".into(),
                password: Some("server-pw".into()),
                sentinel_password: Some("sentinel-pw".into()),
            }),
        );
        for secret in ["url-pw", "cluster-pw", "server-pw", "sentinel-pw"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("redis://<hidden>@h:6379"), "{printed}");
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("hg");
        assert_eq!(k.routes, "{hg}:routes");
        assert_eq!(k.log, "{hg}:log");
    }

    #[test]
    fn stream_ids_compare_by_time_then_sequence() {
        assert!(stream_id_less("1-5", "2-0"));
        assert!(stream_id_less("2-1", "2-10"));
        assert!(!stream_id_less("10-0", "9-99"));
        assert!(!stream_id_less("3-3", "3-3"));
    }

    #[test]
    fn log_entries_become_events() {
        let entry = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(
            event_of(&entry(&[
                ("kind", "batch"),
                ("v", "7"),
                ("changes", r#"[{"op":"del","key":"/a"}]"#)
            ])),
            Some(StoreEvent::Batch(Batch {
                version: 7,
                changes: vec![StoredChange::Del { key: "/a".into() }]
            }))
        );
        assert_eq!(
            event_of(&entry(&[("kind", "batch"), ("v", "x")])),
            Some(StoreEvent::Reload { version: None })
        );
        assert_eq!(
            event_of(&entry(&[("kind", "reload"), ("v", "3")])),
            Some(StoreEvent::Reload { version: Some(3) })
        );
        assert_eq!(
            event_of(&entry(&[
                ("kind", "activity"),
                ("raised", r#"["/a","12"]"#)
            ])),
            Some(StoreEvent::Activity(HashMap::from([("/a".into(), 12)])))
        );
        assert!(matches!(
            event_of(&entry(&[("kind", "revoke"), ("revocation", "{")])),
            Some(StoreEvent::Revoke(Revocation { user: None, .. }))
        ));
        assert_eq!(event_of(&entry(&[("kind", "nope")])), None);
    }
}
