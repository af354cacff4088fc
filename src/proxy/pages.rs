//! The pages hubgate answers with when it cannot forward a request: from `--error-target`, from
//! `--error-path`, or its own.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::ErrorPages;
use crate::http::{empty_body, html, ProxyBody};
use crate::target::Target;
use crate::upstream::{Pool, SendError};

/// What `url=` escapes in an error-target request: everything but unreserved characters, as
/// JavaScript's URLSearchParams does (it writes a space as `+`; `%20` means the same).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'*');

/// The page for an error hubgate answers itself, from wherever the configuration says.
pub(super) async fn error_page(
    pages: &ErrorPages,
    pool: &Arc<Pool>,
    status: StatusCode,
    original: &str,
) -> Response<ProxyBody> {
    match pages {
        ErrorPages::Builtin => {}
        ErrorPages::Target(target) => {
            let query = format!("url={}", utf8_percent_encode(original, QUERY_VALUE));
            match target.origin_form(target.path(), status.as_str(), Some(&query), None) {
                Ok(uri) => match fetch(pool, target, uri).await {
                    Ok((headers, body)) => {
                        let mut resp = Response::new(body);
                        *resp.status_mut() = status;
                        for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING] {
                            if let Some(v) = headers.get(&name) {
                                resp.headers_mut().insert(name, v.clone());
                            }
                        }
                        return resp;
                    }
                    Err(e) => tracing::error!(error = %e, "failed to get custom error page"),
                },
                Err(e) => tracing::error!(error = %e, "cannot build the error-target URL"),
            }
        }
        ErrorPages::Dir(dir) => {
            let specific = dir.join(format!("{}.html", status.as_u16()));
            let page = match tokio::fs::read(&specific).await {
                Ok(page) => Ok(page),
                Err(_) => tokio::fs::read(dir.join("error.html")).await,
            };
            match page {
                Ok(page) => return html(status, Bytes::from(page)),
                Err(e) => tracing::error!(error = %e, dir = %dir.display(), "no error page"),
            }
        }
    }
    html(status, Bytes::from(builtin_page(status)))
}

async fn fetch(
    pool: &Arc<Pool>,
    target: &Target,
    uri: http::Uri,
) -> Result<(HeaderMap, ProxyBody), SendError> {
    let mut req = Request::new(empty_body());
    *req.uri_mut() = uri;
    if let Ok(host) = http::HeaderValue::from_str(target.authority().as_str()) {
        req.headers_mut().insert(header::HOST, host);
    }
    let resp = pool.send(target, req).await?;
    let (parts, body) = resp.into_parts();
    Ok((parts.headers, body.boxed()))
}

fn builtin_page(status: StatusCode) -> String {
    let code = status.as_u16();
    let (title, text) = match code {
        404 => ("Not Found", "Nothing is served at this address."),
        503 => (
            "Service Unavailable",
            "The server behind this address is not answering. It may be starting or stopped.",
        ),
        400 => ("Bad Request", "The request's path could not be understood."),
        _ => (
            status.canonical_reason().unwrap_or("Error"),
            "The proxy could not complete this request.",
        ),
    };
    format!(
        "<!doctype html>\n<html>\n<head><meta charset=\"utf-8\"><title>{code} {title}</title></head>\n\
         <body>\n<h1>{code}: {title}</h1>\n<p>{text}</p>\n<hr>\n<p>hubgate</p>\n</body>\n</html>\n"
    )
}
