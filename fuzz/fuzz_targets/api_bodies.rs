//! The bodies of `POST /api/proxy` (sync) and `PATCH /api/proxy` (batch), through the real API
//! handlers and the real control-plane writer on a memory store.
//!
//! Properties: every answer is 200 or 400; a sync is accepted exactly when every entry has a
//! decodable key, an object with a string target that parses, and no two entries share a key; a
//! refused body changes nothing; an accepted sync leaves exactly its routes with exactly their
//! data, a dry run changes nothing and predicts the real run's counts; an accepted batch does what
//! it says; and the table, listed as `GET /api/proxy` lists it and posted back as a sync, is
//! unchanged by it (it re-serialises and re-parses equal).
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use http::StatusCode;
use http_body_util::BodyExt;
use hubgate::api::{serialize_routes, Api, ApiError, ApiSettings};
use hubgate::control::Control;
use hubgate::path;
use hubgate::routes::RouteTable;
use hubgate::status::Status;
use hubgate::store::MemoryStore;
use hubgate::target::Target;
use hubgate::upstream::ProxyBody;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const KEYS: [&str; 10] = [
    "/",
    "/a",
    "a/",
    "/a/b",
    "/user/alice",
    "/user/alice/",
    "//a//",
    "/%2e%2e",
    "/a%2Fb",
    "/%zz",
];
const TARGETS: [&str; 6] = [
    "http://127.0.0.1:8888",
    "http://127.0.0.1:8888/x?q=1",
    "https://hub.example:443/",
    "http+unix://%2Ftmp%2Fs.sock/p",
    "ftp://nope/",
    "http://h:99999/",
];

#[derive(Arbitrary, Debug)]
enum Key {
    Known(u8),
    Raw(String),
}

impl Key {
    fn render(&self) -> String {
        match self {
            Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_owned(),
            Key::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Target(u8),
}

impl Scalar {
    fn value(&self) -> Value {
        match self {
            Scalar::Null => Value::Null,
            Scalar::Bool(b) => Value::Bool(*b),
            Scalar::Int(i) => Value::from(*i),
            Scalar::Str(s) => Value::String(s.clone()),
            Scalar::Target(i) => Value::String(TARGETS[usize::from(*i) % TARGETS.len()].into()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Entry {
    /// A route object: target, then other fields (which may include `target` again).
    Route(Scalar, Vec<(String, Scalar)>),
    Other(Scalar),
}

impl Entry {
    fn value(&self) -> Value {
        match self {
            Entry::Route(target, fields) => {
                let mut m = Map::new();
                m.insert("target".into(), target.value());
                for (k, v) in fields.iter().take(4) {
                    m.insert(k.clone(), v.value());
                }
                Value::Object(m)
            }
            Entry::Other(s) => s.value(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Body {
    /// Any text; most of it is not JSON and is skipped, as the API answers 400 before parsing.
    Raw(String),
    Sync(Vec<(Key, Entry)>),
    Batch {
        add: Option<Vec<(Key, Entry)>>,
        remove: Option<Vec<Key>>,
        extra: Option<String>,
    },
}

impl Body {
    fn json(&self) -> Option<Value> {
        let object = |entries: &Vec<(Key, Entry)>| {
            Value::Object(
                entries
                    .iter()
                    .take(8)
                    .map(|(k, e)| (k.render(), e.value()))
                    .collect(),
            )
        };
        let v = match self {
            Body::Raw(s) => return serde_json::from_str(s).ok(),
            Body::Sync(entries) => object(entries),
            Body::Batch { add, remove, extra } => {
                let mut m = Map::new();
                if let Some(add) = add {
                    m.insert("add".into(), object(add));
                }
                if let Some(remove) = remove {
                    let keys = remove.iter().take(8).map(|k| Value::String(k.render()));
                    m.insert("remove".into(), Value::Array(keys.collect()));
                }
                if let Some(extra) = extra {
                    m.insert(extra.clone(), Value::Null);
                }
                Value::Object(m)
            }
        };
        // What the API reads is text: go through it, as `read_json` does.
        serde_json::from_str(&v.to_string()).ok()
    }
}

#[derive(Arbitrary, Debug)]
struct Op {
    patch: bool,
    dry_run: bool,
    body: Body,
}

#[derive(Arbitrary, Debug)]
struct Input {
    host_routing: bool,
    ops: Vec<Op>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// The status and JSON body the API answers with. A refusal must be one of the 400s that name
/// what is wrong with the body (never a store failure: the memory store cannot fail).
async fn read(answer: Result<http::Response<ProxyBody>, ApiError>) -> (StatusCode, Value) {
    let resp = match answer {
        Ok(resp) => resp,
        Err(e) => {
            assert!(
                matches!(e, ApiError::Invalid(_)),
                "a body was refused with {e:?}"
            );
            return (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"message": e.to_string()}),
            );
        }
    };
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .expect("an in-memory body")
        .to_bytes();
    let body = serde_json::from_slice(&bytes).expect("API answers are JSON");
    (status, body)
}

/// The table as `{key: data}`, without `last_activity`.
fn contents(table: &RouteTable) -> BTreeMap<String, Map<String, Value>> {
    table
        .snapshot()
        .iter()
        .map(|r| {
            // As the API shows it, so this holds whatever type the table keeps data in.
            let Value::Object(mut data) = r.to_json() else {
                unreachable!("a route is shown as an object")
            };
            data.remove("last_activity");
            (r.key().to_owned(), data)
        })
        .collect()
}

/// What a sync of `entries` must leave, or `None` when it must be refused.
fn expected_sync(
    entries: &Map<String, Value>,
    host_routing: bool,
) -> Option<BTreeMap<String, Map<String, Value>>> {
    let mut out = BTreeMap::new();
    for (raw, data) in entries {
        let key = path::route_key(raw).ok()?;
        let Value::Object(data) = data else {
            return None;
        };
        Target::parse(data.get("target")?.as_str()?).ok()?;
        let mut data = data.clone();
        data.remove("last_activity");
        if host_routing && key != "/" {
            let host = key[1..].split('/').next().unwrap_or_default();
            data.insert("host".into(), Value::String(host.into()));
        }
        if out.insert(key, data).is_some() {
            return None;
        }
    }
    Some(out)
}

fn count(reply: &Value, name: &str) -> u64 {
    reply[name].as_u64().expect("counts are numbers")
}

fuzz_target!(|input: Input| {
    runtime().block_on(async {
        let table = Arc::new(RouteTable::new());
        let (control, _) = Control::start(table.clone(), Arc::new(MemoryStore), input.host_routing)
            .await
            .expect("a memory store loads");
        let status = Arc::new(Status::new(
            table.clone(),
            control.clone(),
            None,
            None,
            true,
            false,
            Vec::new(),
        ));
        let api = Api::new(
            table.clone(),
            control,
            None,
            None,
            status,
            ApiSettings {
                token: None,
                host_routing: input.host_routing,
                max_body: 1 << 20,
                max_sync_body: 1 << 20,
            },
        );
        for op in input.ops.iter().take(6) {
            let Some(body) = op.body.json() else {
                continue;
            };
            let before = contents(&table);
            let version = table.load().version();
            let (status, reply) = if op.patch {
                read(api.notify(body.clone()).await).await
            } else {
                read(api.sync(body.clone(), op.dry_run).await).await
            };
            assert!(
                status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
                "{status}: {reply}"
            );
            let after = contents(&table);
            if status != StatusCode::OK || (op.dry_run && !op.patch) {
                assert_eq!(
                    after, before,
                    "a refused body or a dry run changed the table"
                );
                assert_eq!(table.load().version(), version);
            }
            if !op.patch {
                let expected = body
                    .as_object()
                    .and_then(|entries| expected_sync(entries, input.host_routing));
                assert_eq!(
                    status == StatusCode::OK,
                    expected.is_some(),
                    "{body} -> {reply}"
                );
                if let Some(expected) = expected {
                    let n = expected.len() as u64;
                    let total = count(&reply, "added")
                        + count(&reply, "updated")
                        + count(&reply, "unchanged");
                    assert_eq!(total, n);
                    let gone = before.keys().filter(|k| !expected.contains_key(*k)).count();
                    assert_eq!(count(&reply, "removed"), gone as u64);
                    if op.dry_run {
                        let (status, real) = read(api.sync(body.clone(), false).await).await;
                        assert_eq!(status, StatusCode::OK);
                        for name in ["added", "updated", "removed", "unchanged"] {
                            assert_eq!(
                                count(&real, name),
                                count(&reply, name),
                                "dry run mispredicted {name}"
                            );
                        }
                    }
                    assert_eq!(contents(&table), expected);
                }
            } else if status == StatusCode::OK {
                let body = body.as_object().expect("an accepted batch is an object");
                let mut want = before.clone();
                if let Some(Value::Array(remove)) = body.get("remove") {
                    for k in remove {
                        want.remove(&path::route_key(k.as_str().expect("strings")).expect("valid"));
                    }
                }
                if let Some(Value::Object(add)) = body.get("add") {
                    let added =
                        expected_sync(add, input.host_routing).expect("accepted adds are valid");
                    want.extend(added);
                }
                assert_eq!(after, want);
            }

            // The table as GET lists it, posted back, changes nothing.
            let listed = serialize_routes(table.snapshot().sorted().iter(), &[]);
            let mut listed: Value = serde_json::from_slice(&listed).expect("a listing is JSON");
            for route in listed.as_object_mut().expect("an object").values_mut() {
                route
                    .as_object_mut()
                    .expect("routes are objects")
                    .remove("last_activity");
            }
            let version = table.load().version();
            let (status, reply) = read(api.sync(listed, false).await).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "the listed table was refused: {reply}"
            );
            assert_eq!(count(&reply, "unchanged") as usize, table.load().len());
            assert_eq!(
                count(&reply, "added") + count(&reply, "updated") + count(&reply, "removed"),
                0
            );
            assert_eq!(
                table.load().version(),
                version,
                "a no-op sync moved the version"
            );
        }
    });
});
