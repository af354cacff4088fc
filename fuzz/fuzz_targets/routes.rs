//! The route table (`hubgate::routes`): batches of adds and removes on a `Snapshot`, then
//! lookups, all checked against a naive model (a `BTreeMap` and a longest-prefix search that
//! tries every whole-segment prefix).
//!
//! Properties: after every batch the snapshot holds exactly the model's keys, its version moved
//! by one, `changes_since` the previous version names what the batch changed, every
//! lookup returns the model's route, and every key present matches itself.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arbitrary::Arbitrary;
use hubgate::path;
use hubgate::routes::{Change, Route, RouteData, Snapshot};
use hubgate::target::Target;
use libfuzzer_sys::fuzz_target;

/// Path pieces chosen to collide often and to include the awkward ones.
const PIECES: [&str; 12] = [
    "a", "b", "user", "alice", "", "%2F", "..", ".", "%2e", "A", "x y", "%25",
];

#[derive(Arbitrary, Debug)]
enum Piece {
    Known(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct RawPath(Vec<Piece>);

impl RawPath {
    fn render(&self) -> String {
        let mut s = String::new();
        for p in &self.0 {
            s.push('/');
            match p {
                Piece::Known(i) => s.push_str(PIECES[usize::from(*i) % PIECES.len()]),
                Piece::Raw(r) => s.push_str(r),
            }
        }
        s
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Add(RawPath),
    Remove(RawPath),
}

#[derive(Arbitrary, Debug)]
struct Input {
    batches: Vec<Vec<Op>>,
    lookups: Vec<RawPath>,
}

/// The model's lookup: try each whole-segment prefix, longest first, then `/`.
fn model_lookup<'a>(model: &'a BTreeMap<String, u32>, lookup: &str) -> Option<&'a str> {
    let segments: Vec<&str> = lookup[1..].split('/').collect();
    for k in (1..=segments.len()).rev() {
        let prefix = format!("/{}", segments[..k].join("/"));
        if let Some((key, _)) = model.get_key_value(&prefix) {
            return Some(key);
        }
    }
    model.get_key_value("/").map(|(k, _)| k.as_str())
}

fn route(key: &str, id: u32) -> Arc<Route> {
    let target = format!("http://127.0.0.1:1/{id}");
    let mut data = RouteData::new();
    data.insert("target".into(), target.clone().into());
    Arc::new(Route::new(
        key.into(),
        Target::parse(&target).expect("a valid target"),
        data,
        false,
    ))
}

fn id_of(route: &Route) -> u32 {
    route.target().path()[1..].parse().expect("ids are numbers")
}

fuzz_target!(|input: Input| {
    let mut snap = Snapshot::default();
    let mut model: BTreeMap<String, u32> = BTreeMap::new();
    let mut next_id = 0u32;
    for batch in input.batches.iter().take(16) {
        let before = model.clone();
        let version = snap.version();
        let mut changes = Vec::new();
        let mut touched = BTreeSet::new();
        for op in batch.iter().take(32) {
            match op {
                Op::Add(p) => {
                    let Ok(key) = path::route_key(&p.render()) else {
                        continue;
                    };
                    next_id += 1;
                    model.insert(key.clone(), next_id);
                    touched.insert(key.clone());
                    changes.push(Change::Upsert(route(&key, next_id)));
                }
                Op::Remove(p) => {
                    let Ok(key) = path::route_key(&p.render()) else {
                        continue;
                    };
                    model.remove(&key);
                    touched.insert(key.clone());
                    changes.push(Change::Remove(key.into()));
                }
            }
        }
        snap.apply_batch(changes);
        assert_eq!(snap.version(), version + 1);
        assert_eq!(snap.len(), model.len());
        for (key, id) in &model {
            let r = snap.get(key).expect("a model key is in the table");
            assert_eq!(id_of(r), *id);
            let matched = snap.lookup(key).expect("a key matches itself");
            assert_eq!(matched.key(), key, "key {key:?} matched another route");
        }
        let changes = snap
            .changes_since(version)
            .expect("one batch back is remembered");
        let put: BTreeSet<&str> = changes.put.iter().map(|r| r.key()).collect();
        let removed: BTreeSet<&str> = changes.removed.iter().map(|k| &**k).collect();
        let want_put: BTreeSet<&str> = model
            .iter()
            .filter(|(k, id)| before.get(*k) != Some(id))
            .map(|(k, _)| k.as_str())
            .collect();
        let want_removed: BTreeSet<&str> = before
            .keys()
            .filter(|k| !model.contains_key(*k))
            .map(String::as_str)
            .collect();
        assert_eq!(put, want_put);
        // A key added and removed within the batch may be reported removed too: a no-op for a
        // client mirroring the table, so only that excess is allowed.
        assert!(removed.is_superset(&want_removed));
        for key in removed.difference(&want_removed) {
            assert!(
                !model.contains_key(*key) && !before.contains_key(*key) && touched.contains(*key)
            );
        }
    }
    for raw in input.lookups.iter().take(32) {
        let rendered = raw.render();
        let Ok(p) = path::RequestPath::parse(&rendered) else {
            continue;
        };
        let got = snap.lookup(&p.lookup).map(|r| r.key());
        assert_eq!(
            got,
            model_lookup(&model, &p.lookup),
            "lookup {:?}",
            p.lookup
        );
    }
});
