//! Routing and forwarding on the public address: prefixes, paths, headers, errors, activity.

use http::{Method, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};

use crate::support::{
    dead_port, eventually, full, raw_http, silent_backend, Backend, Hubgate, Resp, WAIT,
};

/// The request target the echo backend saw, from its JSON answer.
fn echoed_path(resp: &Resp) -> String {
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "expected the echo backend: {resp:?}"
    );
    resp.json()["path"]
        .as_str()
        .expect("echo answer has a path")
        .to_owned()
}

/// The comma-separated values of a header the echo backend saw, trimmed; empty when absent.
fn header_values(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"][name]
        .as_str()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_default()
}

fn assert_html_error(resp: &Resp, status: StatusCode, what: &str) {
    assert_eq!(resp.status, status, "{what}: {resp:?}");
    assert!(
        resp.content_type().starts_with("text/html"),
        "{what}: content type {:?}",
        resp.content_type()
    );
    assert!(!resp.body.is_empty(), "{what}: empty error page");
}

#[tokio::test]
async fn longest_prefix_with_a_route_wins() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    for (route, tag) in [
        ("/", "root"),
        ("/b", "b"),
        ("/b/c", "bc"),
        ("/b/c/d", "bcd"),
    ] {
        hg.add_route(route, &echo.url(&format!("/{tag}"))).await;
    }
    for (path, tag) in [
        ("/b/c/dword", "bc"),
        ("/b/cd", "b"),
        ("/b/c/d/e", "bcd"),
        ("/b/c/d", "bcd"),
        ("/b/c", "bc"),
        ("/b", "b"),
        ("/x", "root"),
        ("/bc", "root"),
        ("/B/c", "root"),
        ("/b/C/d", "b"),
    ] {
        let resp = hg.get(path).await;
        assert_eq!(echoed_path(&resp), format!("/{tag}{path}"), "GET {path}");
    }
}

#[tokio::test]
async fn lookup_uses_the_decoded_path_and_forwards_it_encoded() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    let resp = hg
        .api_post(
            "/api/routes/user/foo%40bar",
            &json!({ "target": echo.url("/t") }).to_string(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::CREATED);
    let resp = hg
        .api_post(
            "/api/routes/space%20word",
            &json!({ "target": echo.url("/s") }).to_string(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::CREATED);

    for (path, forwarded) in [
        ("/user/foo%40bar/x", "/t/user/foo%40bar/x"),
        ("/user/foo@bar/x", "/t/user/foo@bar/x"),
        ("/user/foo%40bar", "/t/user/foo%40bar"),
        ("/space%20word/a%2Fb", "/s/space%20word/a%2Fb"),
    ] {
        let resp = hg.get(path).await;
        assert_eq!(echoed_path(&resp), forwarded, "GET {path}");
    }
    let resp = hg.get("/user/foo").await;
    assert_html_error(&resp, StatusCode::NOT_FOUND, "GET /user/foo");
}

#[tokio::test]
async fn query_is_ignored_for_lookup_and_kept_when_forwarding() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/q", &echo.url("/t")).await;
    hg.add_route("/b", &echo.url("/other")).await;

    let resp = hg.get("/q?x=/b&y=a%20b&z").await;
    assert_eq!(echoed_path(&resp), "/t/q?x=/b&y=a%20b&z");
    let resp = hg.get("/q/deeper?token=abc").await;
    assert_eq!(echoed_path(&resp), "/t/q/deeper?token=abc");

    // `/zzz?/q` has no route: the query does not take part in the lookup.
    let resp = hg.get("/zzz?/q").await;
    assert_html_error(&resp, StatusCode::NOT_FOUND, "GET /zzz?/q");
}

#[tokio::test]
async fn no_route_is_404_with_an_html_page() {
    let hg = Hubgate::start(&[]).await;
    for path in ["/", "/anything", "/user/x/lab?y=1"] {
        let resp = hg.get(path).await;
        assert_html_error(&resp, StatusCode::NOT_FOUND, &format!("GET {path}"));
    }
    let echo = Backend::echo().await;
    hg.add_route("/only", &echo.url("")).await;
    let resp = hg.get("/other").await;
    assert_html_error(&resp, StatusCode::NOT_FOUND, "GET /other");
    assert!(echo.seen().is_empty(), "nothing may reach the backend");
}

#[tokio::test]
async fn health_check_answers_before_routing() {
    let hg = Hubgate::start(&[]).await;
    let check = |resp: Resp, what: &str| {
        assert_eq!(resp.status, StatusCode::OK, "{what}: {resp:?}");
        assert!(
            resp.content_type().starts_with("application/json"),
            "{what}: content type {:?}",
            resp.content_type()
        );
        assert_eq!(resp.json(), json!({ "status": "OK" }), "{what}");
    };
    check(hg.get("/_chp_healthz").await, "without routes");

    let echo = Backend::echo().await;
    hg.add_route("/", &echo.url("")).await;
    check(hg.get("/_chp_healthz").await, "with a root route");
    assert!(echo.seen().is_empty(), "health check reached the backend");
}

/// What the backend sees for three requests under these flags: route `/bar` → `<echo>/foo`
/// gets `/bar/rest?q=1` and `/bar/a%20b`; route `/nopath` → `<echo>` gets `/nopath/rest`.
async fn forwarded_paths(flags: &[&str]) -> Vec<String> {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(flags).await;
    hg.add_route("/bar", &echo.url("/foo")).await;
    hg.add_route("/nopath", &echo.url("")).await;
    let mut seen = Vec::new();
    for path in ["/bar/rest?q=1", "/bar/a%20b", "/nopath/rest"] {
        seen.push(echoed_path(&hg.get(path).await));
    }
    seen
}

#[tokio::test]
async fn forwarded_path_default() {
    assert_eq!(
        forwarded_paths(&[]).await,
        ["/foo/bar/rest?q=1", "/foo/bar/a%20b", "/nopath/rest"]
    );
}

#[tokio::test]
async fn forwarded_path_no_prepend_path() {
    assert_eq!(
        forwarded_paths(&["--no-prepend-path"]).await,
        ["/bar/rest?q=1", "/bar/a%20b", "/nopath/rest"]
    );
}

#[tokio::test]
async fn forwarded_path_no_include_prefix() {
    assert_eq!(
        forwarded_paths(&["--no-include-prefix"]).await,
        ["/foo/rest?q=1", "/foo/a%20b", "/rest"]
    );
}

#[tokio::test]
async fn forwarded_path_no_prepend_path_no_include_prefix() {
    assert_eq!(
        forwarded_paths(&["--no-prepend-path", "--no-include-prefix"]).await,
        ["/rest?q=1", "/a%20b", "/rest"]
    );
}

#[tokio::test]
async fn dot_segments_are_resolved_before_routing() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/b", &echo.url("/tb")).await;
    hg.add_route("/b/c", &echo.url("/tbc")).await;
    for (path, forwarded) in [
        ("/b/x/../c/y", "/tbc/b/c/y"),
        ("/b/./c/y", "/tbc/b/c/y"),
        ("/b/c/../x", "/tb/b/x"),
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            hg.proxy
        );
        let resp = raw_http(hg.proxy, request.as_bytes()).await;
        assert_eq!(resp.status, 200, "GET {path}: {resp:?}");
        assert_eq!(resp.json()["path"], forwarded, "GET {path}");
    }
}

#[tokio::test]
async fn undecodable_paths_are_400_and_the_proxy_keeps_serving() {
    let echo = Backend::echo().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/", &echo.url("")).await;
    for path in ["/%", "/%zz", "/%ff", "/user/%c3%28"] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            hg.proxy
        );
        let resp = raw_http(hg.proxy, request.as_bytes()).await;
        assert_eq!(resp.status, 400, "GET {path}: {resp:?}");
    }
    assert!(echo.seen().is_empty(), "bad paths reached the backend");
    assert!(hg.is_running(), "hubgate exited; stderr:\n{}", hg.logs());
    let resp = hg.get("/fine").await;
    assert_eq!(echoed_path(&resp), "/fine");
}

#[tokio::test]
async fn x_forwarded_headers_are_appended() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/", &echo.url("")).await;

    // Existing values get ours appended; X-Forwarded-Host stays as sent.
    let req = hg
        .proxy_request(Method::GET, "/x")
        .header("host", "example.org:8123")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-port", "443")
        .header("x-forwarded-host", "orig.example")
        .body(full(""))
        .unwrap();
    let echoed = hg.proxy_send(req).await.json();
    assert_eq!(
        header_values(&echoed, "x-forwarded-for"),
        ["10.0.0.1", "127.0.0.1"]
    );
    assert_eq!(
        header_values(&echoed, "x-forwarded-proto"),
        ["https", "http"]
    );
    assert_eq!(header_values(&echoed, "x-forwarded-port"), ["443", "8123"]);
    assert_eq!(echoed["headers"]["x-forwarded-host"], "orig.example");
    assert_eq!(echoed["headers"]["host"], "example.org:8123");

    // Without existing values: X-Forwarded-Host from Host, port 80 when Host has none.
    let req = hg
        .proxy_request(Method::GET, "/y")
        .header("host", "example.org")
        .body(full(""))
        .unwrap();
    let echoed = hg.proxy_send(req).await.json();
    assert_eq!(header_values(&echoed, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(header_values(&echoed, "x-forwarded-proto"), ["http"]);
    assert_eq!(header_values(&echoed, "x-forwarded-port"), ["80"]);
    assert_eq!(echoed["headers"]["x-forwarded-host"], "example.org");
    assert_eq!(echoed["headers"]["host"], "example.org");

    // The Host the client used by default is the proxy address.
    let echoed = hg.get("/z").await.json();
    let proxy_port = hg.proxy.port().to_string();
    assert_eq!(header_values(&echoed, "x-forwarded-port"), [proxy_port]);
    assert_eq!(echoed["headers"]["host"], hg.proxy.to_string());
}

#[tokio::test]
async fn no_x_forward_adds_none_of_them() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&["--no-x-forward"]).await;
    hg.add_route("/", &echo.url("")).await;
    let req = hg
        .proxy_request(Method::GET, "/x")
        .header("host", "example.org:8123")
        .body(full(""))
        .unwrap();
    let echoed = hg.proxy_send(req).await.json();
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-host",
    ] {
        assert!(
            echoed["headers"].get(name).is_none(),
            "{name} was added: {echoed}"
        );
    }
    assert_eq!(echoed["headers"]["host"], "example.org:8123");
}

#[tokio::test]
async fn custom_headers_are_added() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&["--custom-header", "X-A: 1", "--custom-header", "X-B:2"]).await;
    hg.add_route("/", &echo.url("")).await;
    let echoed = hg.get("/x").await.json();
    assert_eq!(echoed["headers"]["x-a"], "1", "{echoed}");
    assert_eq!(echoed["headers"]["x-b"], "2", "{echoed}");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/", &echo.url("")).await;
    let request = format!(
        "GET /hop HTTP/1.1\r\nHost: {}\r\nConnection: close, X-Drop\r\nX-Drop: 1\r\n\
         Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\n\
         Trailer: X-Checksum\r\nUpgrade: h2c-nonsense\r\nX-Keep: yes\r\n\r\n",
        hg.proxy
    );
    let resp = raw_http(hg.proxy, request.as_bytes()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let echoed = resp.json();
    let headers = &echoed["headers"];
    for name in [
        "x-drop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            headers.get(name).is_none(),
            "{name} was forwarded: {echoed}"
        );
    }
    // hubgate may send its own Connection header to the backend, never the client's options.
    if let Some(connection) = headers["connection"].as_str() {
        assert!(
            !connection.to_ascii_lowercase().contains("x-drop"),
            "client's Connection options were forwarded: {connection:?}"
        );
    }
    assert_eq!(headers["x-keep"], "yes", "{echoed}");
}

#[tokio::test]
async fn request_method_and_body_are_forwarded() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/p", &echo.url("")).await;
    let req = hg
        .proxy_request(Method::POST, "/p/submit")
        .header("content-type", "text/plain")
        .body(full("hello body"))
        .unwrap();
    let echoed = hg.proxy_send(req).await.json();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["body_len"], 10);
    assert_eq!(echoed["body"], "hello body");
    assert_eq!(echoed["headers"]["content-type"], "text/plain");
}

#[tokio::test]
async fn backend_status_and_body_pass_through() {
    let missing = Backend::fixed(404, "text/plain", "backend says no").await;
    let teapot = Backend::fixed(418, "application/x-tea", "short and stout").await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/missing", &missing.url("")).await;
    hg.add_route("/teapot", &teapot.url("")).await;

    // A 404 from the backend is the backend's, not hubgate's error page.
    let resp = hg.get("/missing/x").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(resp.content_type(), "text/plain");
    assert_eq!(resp.text(), "backend says no");
    assert_eq!(missing.seen().len(), 1);

    let resp = hg.get("/teapot").await;
    assert_eq!(resp.status.as_u16(), 418);
    assert_eq!(resp.content_type(), "application/x-tea");
    assert_eq!(resp.text(), "short and stout");
}

#[tokio::test]
async fn unreachable_upstream_is_503() {
    let hg = Hubgate::start(&[]).await;
    let dead = dead_port();
    hg.add_route("/down", &dead.url()).await;
    let resp = hg.get("/down/x").await;
    assert_html_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "GET /down/x");
}

#[tokio::test]
async fn proxy_timeout_is_503() {
    let silent = silent_backend().await;
    let hg = Hubgate::start(&["--proxy-timeout", "500"]).await;
    hg.add_route("/slow", &format!("http://{}", silent.addr))
        .await;
    let resp = hg.get("/slow/x").await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "{resp:?}");
}

/// The `url` query parameter of an error-target request, decoded.
fn url_param(path_and_query: &str) -> Option<String> {
    let (_, query) = path_and_query.split_once('?')?;
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("url=")?.replace('+', " ");
        Some(percent_decode_str(&value).decode_utf8().ok()?.into_owned())
    })
}

/// `error_target_path` is the path part of `--error-target`; error pages are expected at
/// `<error_target_path>/<code>`.
async fn check_error_target(error_target_path: &str) {
    let errors = Backend::echo().await;
    let hg = Hubgate::start(&["--error-target", &errors.url(error_target_path)]).await;
    let dead = dead_port();
    hg.add_route("/down", &dead.url()).await;

    for (path, status) in [
        ("/nothing/here", StatusCode::NOT_FOUND),
        ("/down/x", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let resp = hg.get(path).await;
        assert_eq!(resp.status, status, "GET {path}: {resp:?}");
        // The error server's body and content type, with hubgate's status.
        assert!(
            resp.content_type().starts_with("application/json"),
            "GET {path}: content type {:?}",
            resp.content_type()
        );
        let echoed = resp.json();
        let asked = echoed["path"].as_str().expect("echoed path").to_owned();
        let (asked_path, _) = asked.split_once('?').unwrap_or((&asked, ""));
        assert_eq!(
            asked_path,
            format!("{error_target_path}/{}", status.as_u16()),
            "GET {path}: error page requested as {asked}"
        );
        assert_eq!(
            url_param(&asked).as_deref(),
            Some(path),
            "error page requested as {asked}"
        );
        assert_eq!(echoed["method"], "GET");
        let seen = errors.seen();
        let last = seen.last().expect("the error server saw the request");
        assert_eq!(
            (last.method.as_str(), last.path.as_str()),
            ("GET", asked.as_str())
        );
    }
    assert_eq!(errors.seen().len(), 2, "one error-page request per error");
}

#[tokio::test]
async fn error_target_serves_error_pages() {
    check_error_target("").await;
}

#[tokio::test]
async fn error_target_with_a_path_as_jupyterhub_uses_it() {
    check_error_target("/hub/error").await;
}

#[tokio::test]
async fn error_target_down_falls_back_to_the_built_in_page() {
    let errors = dead_port();
    let hg = Hubgate::start(&["--error-target", &errors.url()]).await;
    let resp = hg.get("/nothing/here").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND, "{resp:?}");
    assert!(!resp.body.is_empty(), "empty fallback error page");
}

#[tokio::test]
async fn error_path_serves_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("404.html"), "<p>custom not found</p>").unwrap();
    std::fs::write(dir.path().join("error.html"), "<p>generic error</p>").unwrap();
    let error_path = dir.path().to_str().unwrap();
    let hg = Hubgate::start(&["--error-path", error_path]).await;
    let dead = dead_port();
    hg.add_route("/down", &dead.url()).await;

    let resp = hg.get("/nothing").await;
    assert_html_error(&resp, StatusCode::NOT_FOUND, "GET /nothing");
    assert_eq!(resp.text(), "<p>custom not found</p>");

    let resp = hg.get("/down/x").await;
    assert_html_error(&resp, StatusCode::SERVICE_UNAVAILABLE, "GET /down/x");
    assert_eq!(resp.text(), "<p>generic error</p>");
}

#[tokio::test]
async fn host_routing_routes_by_host() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&["--host-routing"]).await;
    hg.add_route("/alice.example.com", &echo.url("/alice"))
        .await;

    let get_as = |host: &'static str| {
        let req = hg
            .proxy_request(Method::GET, "/x")
            .header("host", host)
            .body(full(""))
            .unwrap();
        hg.proxy_send(req)
    };
    let resp = get_as("alice.example.com:8000").await;
    assert_eq!(echoed_path(&resp), "/alice/x");
    let resp = get_as("bob.example.com:8000").await;
    assert_html_error(&resp, StatusCode::NOT_FOUND, "host bob.example.com");

    hg.add_route("/", &echo.url("/default")).await;
    let resp = get_as("bob.example.com").await;
    assert_eq!(echoed_path(&resp), "/default/x");
    let resp = get_as("alice.example.com").await;
    assert_eq!(echoed_path(&resp), "/alice/x");
}

#[tokio::test]
async fn proxied_requests_move_last_activity() {
    let echo = Backend::echo().await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/active", &echo.url("")).await;
    hg.add_route("/idle", &echo.url("")).await;
    let active_before = hg.last_activity("/active").await;
    let idle_before = hg.last_activity("/idle").await;

    let hg = &hg;
    eventually(WAIT, "last_activity of /active to move", || async move {
        let resp = hg.get("/active/x").await;
        assert_eq!(resp.status, StatusCode::OK);
        hg.last_activity("/active").await > active_before
    })
    .await;
    assert_eq!(
        hg.last_activity("/idle").await,
        idle_before,
        "traffic to /active moved /idle"
    );
}
