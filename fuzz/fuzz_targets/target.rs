//! Target URLs (`hubgate::target`), as posted in every route's `target`.
//!
//! Properties: a target that parses parses again to an equal target; its path is absolute; a
//! Unix-socket target's pool authority decodes back to its socket path; and a target that was
//! accepted can build the URI of any request path hyper would accept (so an accepted target never
//! makes every request to its route fail).
#![no_main]

use arbitrary::Arbitrary;
use hubgate::path::{self, RequestPath};
use hubgate::target::{hex_decode, Endpoint, Target};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    target: String,
    request: String,
    query: Option<String>,
}

fuzz_target!(|input: Input| {
    let Ok(t) = Target::parse(&input.target) else {
        return;
    };
    assert_eq!(Target::parse(t.as_str()).as_ref(), Ok(&t));
    assert!(t.path().starts_with('/'));
    let base = t.uri(t.path(), None);
    assert!(
        base.is_ok(),
        "accepted target {:?} builds no URI",
        input.target
    );
    if let Endpoint::Unix(socket) = t.endpoint() {
        let uri = base.expect("checked");
        let authority = uri.authority().expect("an authority").as_str();
        assert_eq!(hex_decode(authority).as_deref(), Some(socket.as_bytes()));
    }

    // A request hyper accepted (a valid path and query), forwarded as the proxy does.
    let pq = match &input.query {
        Some(q) => format!("{}?{q}", input.request),
        None => input.request.clone(),
    };
    let Ok(pq) = http::uri::PathAndQuery::try_from(pq.as_str()) else {
        return;
    };
    if !pq.path().starts_with('/') {
        return;
    }
    let Ok(p) = RequestPath::parse(pq.path()) else {
        return;
    };
    for n in [0, 1, 2] {
        let rest = path::strip_segments(&p.raw, n);
        for base in [t.path(), "/"] {
            let joined = path::join(base, rest);
            let uri = t.uri(&joined, pq.query());
            assert!(
                uri.is_ok(),
                "target {:?}, request {pq}: {joined:?}",
                input.target
            );
        }
    }
});
