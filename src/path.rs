//! Request paths and route keys: percent-decoding, dot segments and the one canonical key form.
//!
//! The router and everything that decides about a request (later: authorization) must agree on
//! which route a path belongs to, so every path goes through [`RequestPath::parse`] exactly once
//! and both sides use its result. Nothing else in the crate decodes a path.

use std::borrow::Cow;

/// Why a path was refused. Each maps to a 400 on the public port or the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("malformed percent-encoding in path")]
    BadEscape,
    #[error("path is not valid UTF-8 once percent-decoded")]
    NotUtf8,
}

/// A request path as the router sees it and as the target will receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath<'a> {
    /// The path still percent-encoded, with dot segments resolved. This is what is forwarded,
    /// so the target sees the same path the router matched.
    pub raw: Cow<'a, str>,
    /// The decoded path in canonical key form (see [`canonical`]), used for lookup. Borrowed
    /// when the request's path is already in that form, as nearly every one is.
    pub lookup: Cow<'a, str>,
}

impl<'a> RequestPath<'a> {
    /// Parses the path part of a request target (no query).
    ///
    /// # Errors
    /// [`PathError`] when the path holds a malformed escape or decodes to invalid UTF-8.
    pub fn parse(raw: &'a str) -> Result<Self, PathError> {
        let raw = remove_dot_segments(raw);
        let lookup = match &raw {
            Cow::Borrowed(r) => canonical_cow(decode(r)?),
            Cow::Owned(r) => Cow::Owned(canonical(&decode(r)?)),
        };
        Ok(RequestPath { raw, lookup })
    }
}

/// Normalises a route key posted to the API: percent-decoded, then [`canonical`].
///
/// # Errors
/// [`PathError`] when the key cannot be decoded.
pub fn route_key(raw: &str) -> Result<String, PathError> {
    Ok(canonical(&decode(raw)?))
}

/// The canonical form shared by keys and lookups: one leading `/`, no trailing `/` (the root is
/// `/`). Runs of slashes at either end are dropped, as CHP's trie does when it splits a path, so
/// `/a/`, `a` and `//a//` are the same key; slashes inside are kept (`/a//b` is its own key).
pub fn canonical(decoded: &str) -> String {
    let inner = decoded.trim_matches('/');
    let mut key = String::with_capacity(inner.len() + 1);
    key.push('/');
    key.push_str(inner);
    key
}

/// [`canonical`], borrowing when `decoded` is in that form already.
fn canonical_cow(decoded: Cow<'_, str>) -> Cow<'_, str> {
    let is_canonical = decoded == "/"
        || (decoded.starts_with('/') && !decoded.starts_with("//") && !decoded.ends_with('/'));
    match decoded {
        Cow::Borrowed(d) if is_canonical => Cow::Borrowed(d),
        d => Cow::Owned(canonical(&d)),
    }
}

/// Strict percent-decoding: `%` must be followed by two hex digits and the result must be UTF-8,
/// as JavaScript's `decodeURIComponent` (which CHP uses) demands. Borrows when there is no `%`.
///
/// # Errors
/// [`PathError::BadEscape`] or [`PathError::NotUtf8`].
pub fn decode(s: &str) -> Result<Cow<'_, str>, PathError> {
    if !s.contains('%') {
        return Ok(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| hex_value(*b));
            let lo = bytes.get(i + 2).and_then(|b| hex_value(*b));
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(PathError::BadEscape),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| PathError::NotUtf8)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Is this raw segment `.`, in any of its encodings (`%2e`, `%2E`)?
fn is_dot(seg: &[u8]) -> bool {
    seg == b"." || seg.eq_ignore_ascii_case(b"%2e")
}

/// Is this raw segment `..`, in any mix of encodings?
fn is_dot_dot(seg: &[u8]) -> bool {
    match seg.len() {
        2 => seg == b"..",
        4 => seg.eq_ignore_ascii_case(b".%2e") || seg.eq_ignore_ascii_case(b"%2e."),
        6 => seg.eq_ignore_ascii_case(b"%2e%2e"),
        _ => false,
    }
}

/// RFC 3986 §5.2.4 on a still-encoded path, treating `%2e` as `.` the way browsers' URL parsers
/// (and so CHP) do. `%2f` is not a separator here, again as in those parsers.
pub fn remove_dot_segments(raw: &str) -> Cow<'_, str> {
    // Runs on every request: most paths hold no `.` and no `%` at all, which one vectorised scan
    // tells; the others are split in a byte loop (`str::split` costs ~100 instructions a segment).
    let has_dot_segment = memchr::memchr2(b'.', b'%', raw.as_bytes()).is_some()
        && raw
            .as_bytes()
            .split(|&b| b == b'/')
            .any(|seg| is_dot(seg) || is_dot_dot(seg));
    if !has_dot_segment {
        return Cow::Borrowed(raw);
    }
    let body = raw.strip_prefix('/').unwrap_or(raw);
    let segments: Vec<&str> = body.split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.into_iter().enumerate() {
        if is_dot(seg.as_bytes()) {
            if i == last {
                out.push("");
            }
        } else if is_dot_dot(seg.as_bytes()) {
            out.pop();
            if i == last {
                out.push("");
            }
        } else {
            out.push(seg);
        }
    }
    let mut path = String::with_capacity(raw.len());
    for seg in out {
        path.push('/');
        path.push_str(seg);
    }
    if path.is_empty() {
        path.push('/');
    }
    Cow::Owned(path)
}

/// How many `/`-separated segments a decoded key has (`/` has none).
pub fn depth(key: &str) -> usize {
    if key == "/" {
        0
    } else {
        key.matches('/').count()
    }
}

/// Removes the first `segments` decoded segments from a raw (encoded, dot-resolved) path, for
/// `--no-include-prefix`. A raw segment holding an encoded `/` counts for as many decoded segments
/// as it spans. Returns the rest, starting with `/`, or `""` when nothing is left.
pub fn strip_segments(raw: &str, segments: usize) -> &str {
    if segments == 0 {
        return raw;
    }
    let mut rest = raw.trim_start_matches('/');
    let mut consumed = 0;
    while consumed < segments && !rest.is_empty() {
        let end = rest.find('/').unwrap_or(rest.len());
        let seg = &rest[..end];
        consumed += 1 + count_encoded_slashes(seg);
        rest = &rest[end..];
        if consumed < segments {
            rest = rest.strip_prefix('/').unwrap_or(rest);
        }
    }
    rest
}

fn count_encoded_slashes(seg: &str) -> usize {
    let b = seg.as_bytes();
    b.windows(3)
        .filter(|w| w[0] == b'%' && w[1] == b'2' && (w[2] == b'f' || w[2] == b'F'))
        .count()
}

/// Joins a target's path and the forwarded request path, merging the slash at the joint, as
/// CHP's proxy library does (`/foo` + `/bar` = `/foo/bar`, `/foo/` + `/bar` = `/foo/bar`).
pub fn join(base: &str, rest: &str) -> String {
    let mut out = String::with_capacity(base.len() + rest.len() + 1);
    join_into(&mut out, base, rest);
    out
}

/// [`join`], written into `out` (which must be empty), so a caller can add a query to the same
/// string.
pub fn join_into(out: &mut String, base: &str, rest: &str) {
    let rooted = base.starts_with('/') || (base.is_empty() && rest.starts_with('/'));
    if !rooted {
        out.push('/');
    }
    out.push_str(base);
    if rest.is_empty() {
        if out.is_empty() {
            out.push('/');
        }
        return;
    }
    match (out.ends_with('/'), rest.starts_with('/')) {
        (true, true) => out.push_str(&rest[1..]),
        (false, false) => {
            out.push('/');
            out.push_str(rest);
        }
        _ => out.push_str(rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_canonical() {
        assert_eq!(route_key("").unwrap(), "/");
        assert_eq!(route_key("/").unwrap(), "/");
        assert_eq!(route_key("user/foo/").unwrap(), "/user/foo");
        assert_eq!(route_key("/user/foo%40bar").unwrap(), "/user/foo@bar");
        assert_eq!(
            route_key("/@/space%20word/user/x/").unwrap(),
            "/@/space word/user/x"
        );
        assert_eq!(route_key("/a//b/").unwrap(), "/a//b");
        assert_eq!(route_key("%").unwrap_err(), PathError::BadEscape);
        assert_eq!(route_key("/%zz").unwrap_err(), PathError::BadEscape);
        assert_eq!(route_key("/%ff").unwrap_err(), PathError::NotUtf8);
    }

    #[test]
    fn dot_segments_resolve_in_every_encoding() {
        let cases = [
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/./b", "/a/b"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a/%2e%2E/b", "/b"),
            ("/a/.%2e/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/a//../b", "/a/b"),
            ("/user/bob/../alice/", "/user/alice/"),
            ("/a/..b/c", "/a/..b/c"),
            ("/a/b", "/a/b"),
        ];
        for (input, want) in cases {
            assert_eq!(remove_dot_segments(input), want, "input {input}");
        }
    }

    #[test]
    fn request_paths_decode_after_dots() {
        let p = RequestPath::parse("/user/alice%2F..%2F").unwrap();
        assert_eq!(p.raw, "/user/alice%2F..%2F");
        assert_eq!(p.lookup, "/user/alice/..");
        let p = RequestPath::parse("//user/a%20b/").unwrap();
        assert_eq!(p.lookup, "/user/a b");
        assert!(RequestPath::parse("/%").is_err());
    }

    #[test]
    fn lookup_keys_borrow_only_what_is_canonical_already() {
        for (input, want, borrowed) in [
            ("/user/alice/api", "/user/alice/api", true),
            ("/", "/", true),
            ("/user/alice/", "/user/alice", false),
            ("//user/alice", "/user/alice", false),
            ("/user/a%20b", "/user/a b", false),
            ("/user/alice/./x", "/user/alice/x", false),
        ] {
            let p = RequestPath::parse(input).unwrap();
            assert_eq!(p.lookup, want, "{input}");
            assert_eq!(matches!(p.lookup, Cow::Borrowed(_)), borrowed, "{input}");
        }
    }

    proptest::proptest! {
        /// The borrowing shortcut gives the very key the long way would.
        #[test]
        fn lookup_is_canonical_decoded_path(path in "[/a.%2eE]{0,12}") {
            let slow = decode(&remove_dot_segments(&path)).map(|d| canonical(&d));
            let fast = RequestPath::parse(&path).map(|p| p.lookup.into_owned());
            proptest::prop_assert_eq!(fast, slow);
        }
    }

    #[test]
    fn strips_decoded_segments_from_raw_paths() {
        assert_eq!(strip_segments("/bar/rest", 1), "/rest");
        assert_eq!(strip_segments("/bar", 1), "");
        assert_eq!(strip_segments("/bar/", 1), "/");
        assert_eq!(strip_segments("/a/b/c", 2), "/c");
        assert_eq!(strip_segments("/a%2Fb/c", 2), "/c");
        assert_eq!(strip_segments("//a/b", 1), "/b");
        assert_eq!(strip_segments("/x", 0), "/x");
    }

    #[test]
    fn joins_like_chp() {
        assert_eq!(join("/foo", "/bar/rest"), "/foo/bar/rest");
        assert_eq!(join("/foo/", "/bar"), "/foo/bar");
        assert_eq!(join("/", "/bar"), "/bar");
        assert_eq!(join("/foo", ""), "/foo");
        assert_eq!(join("", ""), "/");
        assert_eq!(join("/", "/"), "/");
        assert_eq!(join("/foo", "rest"), "/foo/rest");
    }

    #[test]
    fn depth_counts_segments() {
        assert_eq!(depth("/"), 0);
        assert_eq!(depth("/a"), 1);
        assert_eq!(depth("/a/b/c"), 3);
    }
}
