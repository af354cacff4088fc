//! Small HTTP pieces every plane uses: the body type of hubgate's answers and of forwarded
//! messages, responses hubgate writes itself (JSON, HTML, empty), and what a request knows about
//! the connection it came in on.
//!
//! They sit below the data plane, the API, authentication and the servers so that none of those
//! has to reach into another for them.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Bodies of hubgate's own answers and of forwarded messages.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// What a request needs to know about the connection it came in on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address; `None` on a Unix socket.
    pub remote_ip: Option<IpAddr>,
    pub tls: bool,
    /// The client's address as `X-Forwarded-For` writes it (empty on a Unix socket): formatted
    /// once per connection, not on every request (~900 instructions a request in `budget.sh`).
    pub forwarded_for: HeaderValue,
}

impl ConnInfo {
    /// A TCP client at `ip`.
    pub fn tcp(ip: IpAddr) -> ConnInfo {
        ConnInfo {
            remote_ip: Some(ip),
            tls: false,
            forwarded_for: HeaderValue::from_str(&ip.to_canonical().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("")),
        }
    }

    /// A client on a Unix socket: no address.
    pub fn unix() -> ConnInfo {
        ConnInfo {
            remote_ip: None,
            tls: false,
            forwarded_for: HeaderValue::from_static(""),
        }
    }
}

pub fn empty_body() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty(status: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = status;
    resp
}

pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    with_type(status, body.into(), "application/json")
}

pub fn html(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    with_type(status, body.into(), "text/html; charset=utf-8")
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
