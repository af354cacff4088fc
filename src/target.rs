//! Proxy targets: the URLs routes point at, parsed once when a route is added.
//!
//! CHP stores any string as a target and then answers 500 to every request for it. hubgate parses
//! a target when it is posted and refuses what it could never reach, so a bad target is a 400 to
//! the hub instead of an outage for a user.

use std::fmt;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};

/// The URI scheme under which a Unix-socket target travels through the connection pool. Its
/// authority is the socket path, hex-encoded, so that each socket gets its own pool entry.
pub const UNIX_SCHEME: &str = "http+unix";

/// Why a target string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("target {0:?} is not an absolute URL (expected http://, https:// or http+unix://)")]
    NotAbsolute(String),
    #[error("target {0:?} has an unsupported scheme (expected http, https or http+unix)")]
    Scheme(String),
    #[error("target {0:?} has an invalid host or port")]
    Authority(String),
    #[error("target {0:?} must not carry credentials")]
    UserInfo(String),
    #[error("target {0:?} names no Unix socket path")]
    SocketPath(String),
    #[error("target {0:?} has an invalid path or query")]
    Path(String),
}

/// Where a target's connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Http,
    Https,
    /// A Unix socket, by path.
    Unix(String),
}

/// A parsed target URL. Every route holds one, so its path and query are kept as places in the
/// URL it was given rather than strings of their own.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as it was given, for listing and logs.
    raw: Box<str>,
    endpoint: Endpoint,
    scheme: Scheme,
    authority: Authority,
    /// Where the target's path is in `raw`; empty when the URL had none (the path is then `/`).
    path: Span,
    /// Where the target's query is in `raw`, when it is not empty: merged in front of a
    /// request's query as CHP does.
    query: Option<Span>,
    /// How far `raw` names the server (scheme and authority): the key of its connection pool.
    origin_end: u32,
}

/// A byte range of a target's URL.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// Where `part`, a slice of `whole`, lies in it (`None` if it is not one, or too far in).
    fn of(whole: &str, part: &str) -> Option<Span> {
        let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
        let end = start + part.len();
        (end <= whole.len()).then_some(Span {
            start: u32::try_from(start).ok()?,
            end: u32::try_from(end).ok()?,
        })
    }

    fn get(self, whole: &str) -> &str {
        whole
            .get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({})", self.raw)
    }
}

impl Target {
    /// Parses a target URL.
    ///
    /// # Errors
    /// [`TargetError`] naming what is wrong with it.
    pub fn parse(s: &str) -> Result<Self, TargetError> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| TargetError::NotAbsolute(s.to_owned()))?;
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path_and_query) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(TargetError::UserInfo(s.to_owned()));
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q).filter(|q| !q.is_empty())),
            None => (path_and_query, None),
        };
        // The query too: every forwarded request carries it, so one that is not a valid URI
        // would fail them all.
        let checked = match (path, query) {
            ("", Some(q)) => format!("/?{q}"),
            ("", None) => "/".to_owned(),
            (p, Some(q)) => format!("{p}?{q}"),
            (p, None) => p.to_owned(),
        };
        PathAndQuery::try_from(checked).map_err(|_| TargetError::Path(s.to_owned()))?;
        let too_long = || TargetError::Path(s.to_owned());
        let path = match path {
            "" => Span { start: 0, end: 0 },
            path => Span::of(s, path).ok_or_else(too_long)?,
        };
        let query = query
            .map(|q| Span::of(s, q).ok_or_else(too_long))
            .transpose()?;
        let origin_end = Span::of(s, authority).ok_or_else(too_long)?.end;

        let (endpoint, scheme, authority) = match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => {
                let authority = Authority::try_from(authority)
                    .ok()
                    .filter(|a| !a.host().is_empty())
                    .filter(valid_port)
                    .ok_or_else(|| TargetError::Authority(s.to_owned()))?;
                if scheme.eq_ignore_ascii_case("https") {
                    (Endpoint::Https, Scheme::HTTPS, authority)
                } else {
                    (Endpoint::Http, Scheme::HTTP, authority)
                }
            }
            "http+unix" | "unix+http" => {
                let socket = crate::path::decode(authority)
                    .ok()
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| TargetError::SocketPath(s.to_owned()))?
                    .into_owned();
                let authority = Authority::try_from(hex_encode(socket.as_bytes()))
                    .map_err(|_| TargetError::SocketPath(s.to_owned()))?;
                let scheme = Scheme::try_from(UNIX_SCHEME).expect("a valid scheme literal");
                (Endpoint::Unix(socket), scheme, authority)
            }
            _ => return Err(TargetError::Scheme(s.to_owned())),
        };
        Ok(Target {
            raw: s.into(),
            endpoint,
            scheme,
            authority,
            path,
            query,
            origin_end,
        })
    }

    /// The URL as it was given.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The target's own path (`/` when it has none).
    pub fn path(&self) -> &str {
        match self.path.get(&self.raw) {
            "" => "/",
            path => path,
        }
    }

    /// The host and port as they appear in the URL (for `X-Forwarded-Host`-free Host fallbacks).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The scheme and authority as given (`http://host:port`): requests whose targets share it
    /// share connections.
    pub fn origin(&self) -> &str {
        self.raw
            .get(..self.origin_end as usize)
            .unwrap_or(&self.raw)
    }

    /// The request target a request to this server carries (RFC 9112 origin-form): the given
    /// path, then the target's query and the request's, as CHP merges them.
    ///
    /// # Errors
    /// When `path` and `query` do not form a valid request target (they come from a request that
    /// hyper already parsed, so this means a bug or a hostile byte hyper let through).
    ///
    /// When that is exactly what the client `asked` for (a target without path or query, the
    /// path forwarded whole: JupyterHub's routes), it is the client's own, shared rather than
    /// built and parsed again.
    pub fn origin_form(
        &self,
        base: &str,
        rest: &str,
        query: Option<&str>,
        asked: Option<&PathAndQuery>,
    ) -> Result<Uri, http::Error> {
        if let Some(asked) = asked.filter(|a| self.forwards_unchanged(a, base, rest, query)) {
            return Ok(Uri::from(asked.clone()));
        }
        Uri::builder()
            .path_and_query(self.path_and_query(base, rest, query))
            .build()
    }

    /// Whether [`Self::path_and_query`] would give back `asked` itself.
    fn forwards_unchanged(
        &self,
        asked: &PathAndQuery,
        base: &str,
        rest: &str,
        query: Option<&str>,
    ) -> bool {
        let theirs = query.filter(|q| !q.is_empty());
        self.query.is_none()
            && matches!(base, "" | "/")
            && rest.starts_with('/')
            && asked.path() == rest
            && asked.query() == theirs
    }

    /// `base` and `rest` joined as [`crate::path::join`] does, then the queries, in one string.
    fn path_and_query(&self, base: &str, rest: &str, query: Option<&str>) -> String {
        let own = self.query.map(|q| q.get(&self.raw));
        let theirs = query.filter(|q| !q.is_empty());
        let len = |q: Option<&str>| q.map_or(0, |q| q.len() + 1);
        let mut merged =
            String::with_capacity(base.len() + rest.len() + 2 + len(own) + len(theirs));
        crate::path::join_into(&mut merged, base, rest);
        for (i, q) in own.into_iter().chain(theirs).enumerate() {
            merged.push(if i == 0 { '?' } else { '&' });
            merged.push_str(q);
        }
        merged
    }

    /// The absolute URI for a request to this target with the given path and query.
    ///
    /// # Errors
    /// When `path` and `query` do not form a valid request target (they come from a request that
    /// hyper already parsed, so this means a bug or a hostile byte hyper let through).
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(self.path_and_query(path, "", query))
            .build()
    }
}

/// `http` accepts `host:99999` and returns no port for it; a target must not.
fn valid_port(a: &Authority) -> bool {
    let s = a.as_str();
    let after_host = &s[s.rfind(']').map_or(0, |i| i + 1)..];
    match after_host.rsplit_once(':') {
        Some((_, port)) => port.parse::<u16>().is_ok(),
        None => true,
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
    s
}

/// Inverse of the hex encoding used for Unix-socket authorities.
pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_targets() {
        let t = Target::parse("http://127.0.0.1:8888/foo?a=1").unwrap();
        assert_eq!(t.endpoint(), &Endpoint::Http);
        assert_eq!(t.path(), "/foo");
        assert_eq!(
            t.uri("/foo/bar", Some("b=2")).unwrap().to_string(),
            "http://127.0.0.1:8888/foo/bar?a=1&b=2"
        );
        let t = Target::parse("HTTPS://hub.example.com").unwrap();
        assert_eq!(t.endpoint(), &Endpoint::Https);
        assert_eq!(t.path(), "/");
        assert_eq!(
            t.uri("/x", None).unwrap().to_string(),
            "https://hub.example.com/x"
        );
    }

    #[test]
    fn origins_name_the_server_and_origin_forms_carry_no_server() {
        let t = Target::parse("http://127.0.0.1:8888/prefix?a=1").unwrap();
        assert_eq!(t.origin(), "http://127.0.0.1:8888");
        assert_eq!(
            t.origin_form("/x", "", Some("b=2"), None).unwrap(),
            "/x?a=1&b=2"
        );
        assert_eq!(
            t.origin_form("/x", "/y", Some(""), None).unwrap(),
            "/x/y?a=1"
        );
        let t = Target::parse("https://hub.example").unwrap();
        assert_eq!(t.origin(), "https://hub.example");
        assert_eq!(t.origin_form("/", "", None, None).unwrap(), "/");
        let t = Target::parse("http+unix://%2Ftmp%2Fs.sock/p").unwrap();
        assert_eq!(t.origin(), "http+unix://%2Ftmp%2Fs.sock");
    }

    proptest::proptest! {
        /// Sharing the client's path and query gives the very URI that building one would.
        #[test]
        fn the_shared_origin_form_is_the_built_one(
            target in proptest::sample::select(vec![
                "http://h", "http://h/", "http://h/p", "http://h/?t=1", "http://h/p/?t=1",
            ]),
            asked in "/[a-z/]{0,6}(\\?[a-z=&]{0,4})?",
            prepend in proptest::bool::ANY,
        ) {
            let t = Target::parse(target).unwrap();
            let asked: PathAndQuery = asked.parse().unwrap();
            let base = if prepend { t.path() } else { "/" };
            let (rest, query) = (asked.path(), asked.query());
            let shared = t.origin_form(base, rest, query, Some(&asked)).unwrap();
            let built = t.origin_form(base, rest, query, None).unwrap();
            proptest::prop_assert_eq!(shared.to_string(), built.to_string());
        }
    }

    #[test]
    fn parses_unix_targets() {
        let t = Target::parse("http+unix://%2Ftmp%2Fsock/base").unwrap();
        assert_eq!(t.endpoint(), &Endpoint::Unix("/tmp/sock".into()));
        assert_eq!(t.path(), "/base");
        let uri = t.uri("/base/x", None).unwrap();
        assert_eq!(uri.scheme_str(), Some(UNIX_SCHEME));
        let socket = hex_decode(uri.authority().unwrap().as_str()).unwrap();
        assert_eq!(socket, b"/tmp/sock");
    }

    #[test]
    fn refuses_what_cannot_be_reached() {
        for bad in [
            "notaurl",
            "127.0.0.1:8000",
            "ftp://host/",
            "http://",
            "http://user:pw@host/",
            "http+unix:///x",
            "http://host:99999/",
            "http://ho st/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    /// Found by fuzzing (fuzz/fuzz_targets/target.rs): a query that is not a valid URI was
    /// accepted, and then every request to the route failed to build its URI (a 400 each).
    #[test]
    fn refuses_queries_no_request_could_carry() {
        for bad in [
            "https://h/p?a\0b",
            "http://h/?a b",
            "http://127.0.0.1:8888/x?q=\u{7f}",
        ] {
            assert_eq!(
                Target::parse(bad),
                Err(TargetError::Path(bad.to_owned())),
                "{bad:?}"
            );
        }
        let t = Target::parse("http://h/p?a=1&b=%20").unwrap();
        assert!(t.uri("/p/x", Some("c=2")).is_ok());
    }
}
