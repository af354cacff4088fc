//! Credentials as requests carry them (`hubgate::auth`): the `Authorization` header, `?token=`
//! and its removal, `Cookie` headers and the removal of hubgate's own cookies before forwarding,
//! and the OAuth `next` a login returns to.
//!
//! Properties: a token read from a header is one non-empty word that the header holds, and a
//! header made from it reads back the same; a query stripped of its token holds no token and
//! keeps every other parameter in order; once hubgate's cookies are removed neither can be read,
//! and every other cookie reads as before; the page a login returns to, resolved the way a
//! browser resolves a `Location`, is always on the same origin.
#![no_main]

use arbitrary::Arbitrary;
use http::header::{self, HeaderMap, HeaderValue};
use hubgate::auth::oauth::{safe_next, STATE_COOKIE};
use hubgate::auth::{
    cookie, header_token, query_token, remove_cookies, strip_token_param, SESSION_COOKIE,
};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 5] = [
    SESSION_COOKIE,
    STATE_COOKIE,
    "a",
    "jupyterhub-session-id",
    "",
];

#[derive(Arbitrary, Debug)]
struct Input {
    authorization: Vec<u8>,
    query: String,
    cookies: Vec<Vec<u8>>,
    probe: String,
    next: String,
}

fuzz_target!(|input: Input| {
    // Authorization
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(&input.authorization) {
        h.insert(header::AUTHORIZATION, v);
        if let Some(t) = header_token(&h) {
            assert!(!t.is_empty() && !t.contains(char::is_whitespace));
            let value = h[header::AUTHORIZATION]
                .to_str()
                .expect("it was read as text");
            assert!(value.trim_end().ends_with(&t));
            let mut again = HeaderMap::new();
            let made = HeaderValue::from_str(&format!("token {t}")).expect("a valid value");
            again.insert(header::AUTHORIZATION, made);
            assert_eq!(header_token(&again).as_deref(), Some(t.as_str()));
        }
    }

    // ?token= and its removal
    let q = Some(input.query.as_str());
    let stripped = strip_token_param(q);
    assert_eq!(
        query_token(stripped.as_deref()),
        None,
        "a token survived stripping"
    );
    if let Some(s) = &stripped {
        let original: Vec<&str> = input.query.split('&').collect();
        let mut at = 0;
        for pair in s.split('&') {
            let found = original[at..].iter().position(|p| *p == pair);
            at += found.expect("kept pairs are the original's, in order") + 1;
        }
    }

    // Cookies
    let mut h = HeaderMap::new();
    for c in input.cookies.iter().take(4) {
        if let Ok(v) = HeaderValue::from_bytes(c) {
            h.append(header::COOKIE, v);
        }
    }
    let before: Vec<Option<String>> = NAMES
        .iter()
        .chain([&input.probe.as_str()])
        .map(|n| cookie(&h, n))
        .collect();
    remove_cookies(&mut h, &[SESSION_COOKIE, STATE_COOKIE]);
    assert_eq!(
        cookie(&h, SESSION_COOKIE),
        None,
        "the session cookie would be forwarded"
    );
    assert_eq!(
        cookie(&h, STATE_COOKIE),
        None,
        "the state cookie would be forwarded"
    );
    for (name, was) in NAMES.iter().chain([&input.probe.as_str()]).zip(before) {
        if *name != SESSION_COOKIE && *name != STATE_COOKIE {
            assert_eq!(cookie(&h, name), was, "cookie {name:?} changed");
        }
    }

    // Where a login returns to
    let next = safe_next(&input.next);
    assert!(next == input.next || next == "/");
    let origin = url::Url::parse("https://hub.example/hub/").expect("a valid base");
    // A value that is not a valid header value never becomes a `Location`.
    let location = HeaderValue::from_str(next).is_ok();
    if let (true, Ok(resolved)) = (location, origin.join(next)) {
        assert_eq!(
            resolved.origin(),
            origin.origin(),
            "{:?} leads a browser off the site",
            input.next
        );
    }
});
