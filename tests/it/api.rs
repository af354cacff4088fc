//! The REST API on the API address: authentication, the route table, and bad requests.

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::{
    assert_json_error, dead_port, eventually, format_timestamp, now_millis, parse_raw_response,
    parse_timestamp, Backend, Hubgate, WAIT,
};

const TARGET: &str = "http://127.0.0.1:9";

fn keys(table: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<String> = table.keys().cloned().collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn requests_without_the_right_token_are_403_with_empty_body() {
    let hg = Hubgate::start(&[]).await;
    let tok = hg.token().to_owned();
    let bad_headers = [
        None,
        Some("token wrong".to_owned()),
        Some(format!("token {tok}x")),
        Some(tok.clone()),
        Some(format!("xtoken {tok}")),
        Some(format!("Bearer {tok}")),
        Some(format!("token {tok} extra")),
    ];
    let post = json!({ "target": TARGET }).to_string();
    let calls = [
        (Method::GET, "/api/routes", ""),
        (Method::GET, "/api/routes/x", ""),
        (Method::POST, "/api/routes/x", post.as_str()),
        (Method::DELETE, "/api/routes/x", ""),
    ];
    for auth in &bad_headers {
        for (method, path, body) in &calls {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("authorization", a)])
                .unwrap_or_default();
            let resp = hg
                .api_with(method.clone(), path, &headers, body.to_string())
                .await;
            assert_eq!(
                resp.status,
                StatusCode::FORBIDDEN,
                "{method} {path} with Authorization {auth:?}: {resp:?}"
            );
            assert!(
                resp.body.is_empty(),
                "{method} {path} with Authorization {auth:?}: 403 body should be empty, got {:?}",
                resp.text()
            );
        }
    }
    let table = hg.routes().await;
    assert!(
        table.is_empty(),
        "rejected POSTs must not add routes: {table:?}"
    );
    let resp = hg
        .api_with(
            Method::GET,
            "/api/routes",
            &[("authorization", &format!("token {tok}"))],
            "",
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "right token: {resp:?}");
}

/// Reading and adding routes without a token works.
async fn assert_api_is_open(hg: &Hubgate) {
    let resp = hg.api_with(Method::GET, "/api/routes", &[], "").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let body = json!({ "target": TARGET }).to_string();
    let resp = hg
        .api_with(Method::POST, "/api/routes/open", &[], body)
        .await;
    assert_eq!(resp.status, StatusCode::CREATED, "{resp:?}");
    assert!(hg.route("/open").await.is_some());
}

#[tokio::test]
async fn api_is_open_when_token_is_unset() {
    assert_api_is_open(&Hubgate::builder().open_api().start().await).await;
}

#[tokio::test]
async fn api_is_open_when_token_is_empty() {
    assert_api_is_open(&Hubgate::builder().token("").start().await).await;
}

#[tokio::test]
async fn paths_outside_api_routes_are_404() {
    let hg = Hubgate::start(&[]).await;
    for path in [
        "/",
        "/api",
        "/api/",
        "/api/route",
        "/api/routesx",
        "/api/routes2/x",
        "/API/routes",
        "/x/api/routes",
    ] {
        let resp = hg.api_get(path).await;
        assert_eq!(resp.status, StatusCode::NOT_FOUND, "GET {path}: {resp:?}");
    }
}

#[tokio::test]
async fn other_methods_are_405_before_auth() {
    let hg = Hubgate::start(&[]).await;
    let good = format!("token {}", hg.token());
    for method in [Method::PUT, Method::PATCH, Method::OPTIONS] {
        for path in ["/api/routes", "/api/routes/x"] {
            for headers in [
                vec![],
                vec![("authorization", "token wrong")],
                vec![("authorization", good.as_str())],
            ] {
                let resp = hg.api_with(method.clone(), path, &headers, "").await;
                assert_eq!(
                    resp.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} with {headers:?}: {resp:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn get_routes_lists_every_posted_key() {
    let hg = Hubgate::start(&[]).await;
    let before = now_millis();
    hg.add_route_data(
        "/user/alice",
        json!({ "target": "http://127.0.0.1:8001", "user": "alice", "jupyterhub": true,
                "nested": { "a": [1, 2] } }),
    )
    .await;
    hg.add_route_data(
        "/hub",
        json!({ "target": "http://127.0.0.1:8002", "hub": true }),
    )
    .await;

    let resp = hg.api_get("/api/routes").await;
    assert_eq!(resp.status, StatusCode::OK);
    assert!(
        resp.content_type().starts_with("application/json"),
        "content type {:?}",
        resp.content_type()
    );
    let table = match resp.json() {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    };
    assert_eq!(keys(&table), ["/hub", "/user/alice"]);

    let alice = &table["/user/alice"];
    assert_eq!(alice["target"], "http://127.0.0.1:8001");
    assert_eq!(alice["user"], "alice");
    assert_eq!(alice["jupyterhub"], true);
    assert_eq!(alice["nested"], json!({ "a": [1, 2] }));
    let hub = &table["/hub"];
    assert_eq!(hub["target"], "http://127.0.0.1:8002");
    assert_eq!(hub["hub"], true);

    for (key, route) in &table {
        let stamp = route["last_activity"]
            .as_str()
            .unwrap_or_else(|| panic!("{key} has no string last_activity: {route}"));
        let millis = parse_timestamp(stamp).unwrap_or_else(|| {
            panic!("{key}: last_activity {stamp:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ")
        });
        // UTC, not local time: within ten minutes of this machine's clock.
        assert!(
            (millis - before).abs() < 600_000,
            "{key}: last_activity {stamp} is far from now ({})",
            format_timestamp(before)
        );
    }
}

#[tokio::test]
async fn get_single_route_or_404() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route_data("/a/b", json!({ "target": TARGET, "extra": "kept" }))
        .await;

    let resp = hg.api_get("/api/routes/a/b").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert!(resp.content_type().starts_with("application/json"));
    let route = resp.json();
    assert_eq!(route["target"], TARGET);
    assert_eq!(route["extra"], "kept");
    assert!(route["last_activity"].is_string(), "{route}");

    for missing in ["/api/routes/a", "/api/routes/a/b/c", "/api/routes/nothing"] {
        let resp = hg.api_get(missing).await;
        assert_eq!(
            resp.status,
            StatusCode::NOT_FOUND,
            "GET {missing}: {resp:?}"
        );
        assert!(
            resp.body.is_empty(),
            "GET {missing}: body {:?}",
            resp.text()
        );
    }

    let resp = hg.api_get("/api/routes/").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let table = resp.json();
    assert_eq!(
        table["/a/b"]["target"], TARGET,
        "GET /api/routes/ must list the whole table: {table}"
    );
}

#[tokio::test]
async fn post_accepts_any_content_type() {
    let hg = Hubgate::start(&[]).await;
    let auth = format!("token {}", hg.token());
    for (key, content_type) in [
        ("/plain", Some("text/plain; charset=utf-8")),
        ("/json", Some("application/json")),
        ("/none", None),
        ("/form", Some("application/x-www-form-urlencoded")),
    ] {
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        let body = json!({ "target": TARGET, "jupyterhub": true }).to_string();
        let resp = hg
            .api_with(Method::POST, &format!("/api/routes{key}"), &headers, body)
            .await;
        assert_eq!(
            resp.status,
            StatusCode::CREATED,
            "POST with content type {content_type:?}: {resp:?}"
        );
        assert!(resp.body.is_empty(), "201 body: {:?}", resp.text());
    }
    let table = hg.routes().await;
    assert_eq!(keys(&table), ["/form", "/json", "/none", "/plain"]);
    assert_eq!(table["/plain"]["jupyterhub"], true);
}

#[tokio::test]
async fn post_replaces_data_and_resets_last_activity() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route_data(
        "/r",
        json!({ "target": "http://127.0.0.1:1001", "first": 1 }),
    )
    .await;
    let first = hg.last_activity("/r").await;

    let hg = &hg;
    eventually(
        WAIT,
        "a re-POST to move last_activity of /r",
        || async move {
            hg.add_route_data(
                "/r",
                json!({ "target": "http://127.0.0.1:1002", "second": 2 }),
            )
            .await;
            hg.last_activity("/r").await > first
        },
    )
    .await;

    let route = hg.route("/r").await.expect("/r is listed");
    assert_eq!(route["target"], "http://127.0.0.1:1002", "{route}");
    assert_eq!(route["second"], 2, "{route}");
    assert!(
        route.get("first").is_none(),
        "old keys must be gone after a re-POST: {route}"
    );
}

#[tokio::test]
async fn post_without_path_sets_the_root_route() {
    let hg = Hubgate::start(&[]).await;
    let resp = hg
        .api_post("/api/routes", &json!({ "target": TARGET }).to_string())
        .await;
    assert_eq!(resp.status, StatusCode::CREATED, "{resp:?}");
    let table = hg.routes().await;
    assert_eq!(keys(&table), ["/"]);
    assert_eq!(table["/"]["target"], TARGET);
}

#[tokio::test]
async fn accepted_target_schemes() {
    let hg = Hubgate::start(&[]).await;
    for (key, target) in [
        ("/http", "http://127.0.0.1:8000"),
        ("/http-path", "http://127.0.0.1:8000/some/path"),
        ("/http-name", "http://backend.internal:8000/"),
        ("/https", "https://example.org/x"),
        ("/unix", "http+unix://%2Ftmp%2Fhub.sock"),
    ] {
        hg.add_route(key, target).await;
        let route = hg.route(key).await.expect("listed");
        assert_eq!(route["target"], target, "target is kept as posted");
    }
}

#[tokio::test]
async fn bad_posts_are_400_and_leave_the_table_unchanged() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route_data("/keep", json!({ "target": TARGET, "mark": "original" }))
        .await;
    let before = hg.routes().await;

    enum Expect {
        Prefix(&'static str),
        Contains(&'static str),
        NamesTarget,
        AnyMessage,
    }
    use Expect::*;
    let cases: Vec<(String, Expect)> = vec![
        (
            r#"{"target": "http://127.0.0.1:1""#.into(),
            Prefix("Body not valid JSON"),
        ),
        ("not json at all".into(), Prefix("Body not valid JSON")),
        (String::new(), AnyMessage),
        ("{}".into(), Contains("Must specify 'target' as string")),
        (
            r#"{"targets": "http://127.0.0.1:1"}"#.into(),
            Contains("Must specify 'target' as string"),
        ),
        (
            r#"{"target": 5}"#.into(),
            Contains("Must specify 'target' as string"),
        ),
        (
            r#"{"target": null}"#.into(),
            Contains("Must specify 'target' as string"),
        ),
        (
            r#"{"target": ["http://127.0.0.1:1"]}"#.into(),
            Contains("Must specify 'target' as string"),
        ),
        ("[]".into(), Contains("Must specify 'target' as string")),
        ("null".into(), Contains("Must specify 'target' as string")),
        (
            r#""http://127.0.0.1:1""#.into(),
            Contains("Must specify 'target' as string"),
        ),
        (json!({ "target": "notaurl" }).to_string(), NamesTarget),
        (json!({ "target": "" }).to_string(), NamesTarget),
        (
            json!({ "target": "/relative/path" }).to_string(),
            NamesTarget,
        ),
        (
            json!({ "target": "127.0.0.1:8000" }).to_string(),
            NamesTarget,
        ),
        (
            json!({ "target": "ftp://127.0.0.1/" }).to_string(),
            NamesTarget,
        ),
        (json!({ "target": "http://" }).to_string(), NamesTarget),
    ];
    for (body, expect) in cases {
        for key in ["/keep", "/new"] {
            let what = format!("POST {key} with body {body:?}");
            let resp = hg.api_post(&format!("/api/routes{key}"), &body).await;
            let message = assert_json_error(&resp, StatusCode::BAD_REQUEST, &what);
            match expect {
                Prefix(prefix) => assert!(
                    message.starts_with(prefix),
                    "{what}: message {message:?} should start with {prefix:?}"
                ),
                Contains(part) => assert!(
                    message.contains(part),
                    "{what}: message {message:?} should contain {part:?}"
                ),
                NamesTarget => assert!(
                    message.to_lowercase().contains("target"),
                    "{what}: message {message:?} should name the target problem"
                ),
                AnyMessage => {}
            }
            assert_eq!(hg.routes().await, before, "{what}: table changed");
        }
    }
}

/// POST a body through a raw socket, reading the answer while still writing: the server may
/// answer and close before it has read everything.
async fn post_raw(hg: &Hubgate, path: &str, body: Vec<u8>) -> u16 {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: token {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        hg.api,
        hg.token(),
        body.len()
    );
    let stream = TcpStream::connect(hg.api).await.expect("connect api");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for chunk in body.chunks(64 * 1024) {
            if write.write_all(chunk).await.is_err() {
                return;
            }
        }
        // Dropping the write half would half-close the connection; ordinary clients don't.
        std::future::pending::<()>().await;
    });
    let read_head = async {
        let mut data = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            if let Some(resp) = parse_raw_response(&data) {
                return Some(resp.status);
            }
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    };
    let status = tokio::time::timeout(WAIT, read_head)
        .await
        .unwrap_or_else(|_| panic!("POST {path}: no response head within {WAIT:?}"))
        .unwrap_or_else(|| panic!("POST {path}: connection closed without a response"));
    writer.abort();
    status
}

#[tokio::test]
async fn body_over_one_mebibyte_is_413() {
    let hg = Hubgate::start(&[]).await;
    let pad = "x".repeat(1024 * 1024 + 1024);
    let body = json!({ "target": TARGET, "pad": pad })
        .to_string()
        .into_bytes();
    let status = post_raw(&hg, "/api/routes/big", body).await;
    assert_eq!(status, 413, "POST of more than 1 MiB");
    assert!(hg.routes().await.is_empty(), "table must stay empty");

    // Half a mebibyte is within the limit.
    let pad = "y".repeat(512 * 1024);
    let body = json!({ "target": TARGET, "pad": pad })
        .to_string()
        .into_bytes();
    let status = post_raw(&hg, "/api/routes/half", body).await;
    assert_eq!(status, 201, "POST of 512 KiB");
    let route = hg.route("/half").await.expect("/half is listed");
    assert_eq!(route["pad"].as_str().map(str::len), Some(512 * 1024));
}

#[tokio::test]
async fn bad_json_with_bad_token_is_400_but_good_json_is_403() {
    let hg = Hubgate::start(&[]).await;
    let resp = hg
        .api_with(
            Method::POST,
            "/api/routes/x",
            &[("authorization", "token wrong")],
            "{not json",
        )
        .await;
    let message = assert_json_error(&resp, StatusCode::BAD_REQUEST, "bad JSON with a bad token");
    assert!(message.starts_with("Body not valid JSON"), "{message:?}");

    let resp = hg
        .api_with(
            Method::POST,
            "/api/routes/x",
            &[("authorization", "token wrong")],
            json!({ "target": TARGET }).to_string(),
        )
        .await;
    assert_eq!(resp.status, StatusCode::FORBIDDEN, "{resp:?}");
    assert!(hg.routes().await.is_empty());
}

#[tokio::test]
async fn delete_is_204_then_404() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/gone", TARGET).await;
    hg.add_route("/stays", TARGET).await;

    let resp = hg.api_delete("/api/routes/gone").await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{resp:?}");
    assert_eq!(keys(&hg.routes().await), ["/stays"]);
    let resp = hg.api_get("/api/routes/gone").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);

    let resp = hg.api_delete("/api/routes/gone").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND, "{resp:?}");
    let resp = hg.api_delete("/api/routes/never").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND, "{resp:?}");
    assert_eq!(keys(&hg.routes().await), ["/stays"]);
}

#[tokio::test]
async fn keys_are_normalised_and_decoded() {
    let hg = Hubgate::start(&[]).await;
    for path in [
        "/api/routes/user/foo%40bar",
        "/api/routes/@/space%20word/user/x/",
        "/api/routes/trailing/",
        "/api/routes/user/%E2%98%83",
    ] {
        let resp = hg
            .api_post(path, &json!({ "target": TARGET }).to_string())
            .await;
        assert_eq!(resp.status, StatusCode::CREATED, "POST {path}: {resp:?}");
    }
    assert_eq!(
        keys(&hg.routes().await),
        [
            "/@/space word/user/x",
            "/trailing",
            "/user/foo@bar",
            "/user/\u{2603}"
        ]
    );

    for path in [
        "/api/routes/user/foo%40bar",
        "/api/routes/user/foo@bar",
        "/api/routes/user/foo@bar/",
        "/api/routes/@/space%20word/user/x",
        "/api/routes/@/space%20word/user/x/",
        "/api/routes/trailing",
    ] {
        let resp = hg.api_get(path).await;
        assert_eq!(resp.status, StatusCode::OK, "GET {path}: {resp:?}");
        assert_eq!(resp.json()["target"], TARGET, "GET {path}");
    }

    let resp = hg.api_delete("/api/routes/user/foo%40bar").await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{resp:?}");
    let resp = hg.api_delete("/api/routes/@/space%20word/user/x/").await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{resp:?}");
    assert_eq!(keys(&hg.routes().await), ["/trailing", "/user/\u{2603}"]);
}

#[tokio::test]
async fn inactive_since_keeps_routes_idle_since_the_date() {
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/old", TARGET).await;
    let old = hg.last_activity("/old").await;
    let hg = &hg;
    eventually(
        WAIT,
        "/new to get a later last_activity than /old",
        || async move {
            hg.add_route("/new", TARGET).await;
            hg.last_activity("/new").await > old
        },
    )
    .await;
    let new = hg.last_activity("/new").await;

    for param in ["inactive_since", "inactiveSince"] {
        for (since, expected) in [
            (format_timestamp(new), vec!["/old"]),
            ("2999-01-01T00:00:00.000Z".to_owned(), vec!["/new", "/old"]),
            ("2000-01-01T00:00:00.000Z".to_owned(), vec![]),
        ] {
            let path = format!("/api/routes?{param}={since}");
            let resp = hg.api_get(&path).await;
            assert_eq!(resp.status, StatusCode::OK, "GET {path}: {resp:?}");
            let table = match resp.json() {
                Value::Object(map) => map,
                other => panic!("GET {path}: not an object: {other}"),
            };
            assert_eq!(keys(&table), expected, "GET {path}");
        }
        let path = format!("/api/routes?{param}=endoftime");
        let resp = hg.api_get(&path).await;
        let message = assert_json_error(&resp, StatusCode::BAD_REQUEST, &format!("GET {path}"));
        assert!(
            message.contains("Invalid datestamp"),
            "GET {path}: message {message:?}"
        );
    }
}

#[tokio::test]
async fn host_routing_adds_host_to_route_data() {
    let hg = Hubgate::start(&["--host-routing"]).await;
    hg.add_route("/alice.example.com/lab", TARGET).await;
    let route = hg
        .route("/alice.example.com/lab")
        .await
        .expect("route is listed");
    assert_eq!(route["host"], "alice.example.com", "{route}");
    assert_eq!(route["target"], TARGET, "{route}");
}

#[tokio::test]
async fn default_target_is_the_root_route_from_the_start() {
    let backend = Backend::echo().await;
    let target = backend.url("");
    let hg = Hubgate::start(&["--default-target", &target]).await;
    let table = hg.routes().await;
    assert_eq!(keys(&table), ["/"], "{table:?}");
    assert_eq!(table["/"]["target"], target.as_str());

    let resp = hg.get("/anything/here").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json()["path"], "/anything/here");

    // And the default route is an ordinary route: it can be replaced.
    let dead = dead_port();
    let other = dead.url();
    hg.add_route("/", &other).await;
    assert_eq!(
        hg.route("/").await.expect("listed")["target"],
        other.as_str()
    );
}
