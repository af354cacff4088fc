//! Request paths and route keys (`hubgate::path`): what every request and every posted key goes
//! through before the router sees it.
//!
//! Properties, beyond "no panic":
//! - `canonical` and `remove_dot_segments` are idempotent, and no dot segment (in any encoding)
//!   survives the latter;
//! - a parsed request path re-parses to itself (what is forwarded routes as it was routed);
//! - `decode` inverts percent-encoding;
//! - a key the API accepts is reached by a request for that key (dot-segment keys excepted: no
//!   request can name them, see benches/results/fuzz-2026-11-23.md);
//! - stripping segments and joining with a target path always give an absolute path.
#![no_main]

use hubgate::path::{self, RequestPath};
use libfuzzer_sys::fuzz_target;

fn is_dot_segment(seg: &str) -> bool {
    let lower = seg.to_ascii_lowercase();
    matches!(
        lower.as_str(),
        "." | "%2e" | ".." | ".%2e" | "%2e." | "%2e%2e"
    )
}

/// Percent-encodes every byte that is `%` or not printable ASCII, as a client would.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b == b'%' || !(0x21..0x7f).contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };

    let c = path::canonical(raw);
    assert_eq!(path::canonical(&c), c, "canonical is a fixed point");
    assert!(c.starts_with('/'));
    assert!(c == "/" || !c.ends_with('/'), "no trailing slash: {c:?}");

    let once = path::remove_dot_segments(raw);
    assert_eq!(
        path::remove_dot_segments(&once),
        once,
        "dot-segment removal is a fixed point"
    );
    assert!(
        !once.split('/').any(is_dot_segment),
        "a dot segment survived: {raw:?} -> {once:?}"
    );

    assert_eq!(path::decode(&encode(raw)).as_deref(), Ok(raw));

    if let Ok(p) = RequestPath::parse(raw) {
        let again = RequestPath::parse(&p.raw).expect("a parsed path parses again");
        assert_eq!(again, p, "parsing a parsed path changes nothing");
        assert_eq!(path::canonical(&p.lookup), p.lookup);
        let depth = path::depth(&p.lookup);
        for n in 0..=depth + 1 {
            let rest = path::strip_segments(&p.raw, n);
            // Request paths from hyper are absolute (`*` aside); others keep their form at 0.
            if raw.starts_with('/') {
                assert!(rest.is_empty() || rest.starts_with('/'), "{rest:?}");
            }
            for base in ["/", "/base", "/base/"] {
                assert!(path::join(base, rest).starts_with('/'));
            }
        }
    }

    if let Ok(key) = path::route_key(raw) {
        assert_eq!(path::canonical(&key), key, "keys are canonical");
        assert_eq!(path::route_key(&encode(&key)).as_deref(), Ok(key.as_str()));
        if !key.split('/').any(|s| s == "." || s == "..") {
            let request = encode(&key);
            let p = RequestPath::parse(&request).expect("an encoded key is a valid path");
            assert_eq!(
                p.lookup, key,
                "a request for key {key:?} looks up another path"
            );
            let deeper = format!("{request}/x");
            let below = RequestPath::parse(&deeper).expect("valid");
            assert!(below.lookup.starts_with(&key));
        }
    }
});
