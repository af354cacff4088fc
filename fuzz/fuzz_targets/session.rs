//! hubgate's session cookies and OAuth callbacks (`hubgate::auth::session`, `auth::oauth`):
//! HS256 JWTs that browsers hand back, and the hub's redirect to `/oauth_callback`.
//!
//! Properties: any text is read without panicking; a session made for any identity reads back as
//! exactly that identity (or, expired, as its name and token); a session changed anywhere never
//! reads as someone else, and one signed with another secret never reads at all; a callback with
//! parameters and cookies from anyone is refused (400/403) unless it carries a state hubgate
//! signed and the browser's matching cookie, and then it asks the hub (here: unreachable, 503).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{header, Request, StatusCode};
use hubgate::auth::oauth::{OAuthSettings, STATE_COOKIE};
use hubgate::auth::session::{SessionCheck, Signer};
use hubgate::auth::{Auth, AuthSettings, Identity};
use hubgate::hub::Hub;
use hubgate::target::Target;
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzzing-secret-of-at-least-32-bytes!";

#[derive(Arbitrary, Debug)]
struct Who {
    name: String,
    admin: bool,
    groups: Vec<String>,
    scopes: Option<Vec<String>>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    text: String,
    who: Who,
    lifetime: u16,
    expired: bool,
    hub_token: Option<String>,
    tamper_at: usize,
    tamper_with: u8,
    query: String,
    cookie: Vec<u8>,
    /// Sign this `next` into a real state, and send the matching verifier cookie when true.
    state: Option<(String, bool)>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fn auth() -> &'static Auth {
    static AUTH: OnceLock<Auth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let tls = hubgate::tls::client_config(&Default::default(), true).expect("a TLS config");
        let hub = Hub::new(
            Target::parse("http://127.0.0.1:1/hub/api/").expect("valid"),
            Some("hub-token".into()),
            hubgate::upstream::client(tls),
            None,
        );
        Auth::new(
            Arc::new(hub),
            AuthSettings {
                cache_ttl: Duration::from_secs(300),
                negative_ttl: Duration::from_secs(10),
                cache_size: 1000,
                grace: Duration::from_secs(0),
                allow_token_in_url: false,
                legacy_token_endpoint: false,
                hub_login_cookie: None,
                oauth: Some(OAuthSettings {
                    client_id: "service-hubgate".into(),
                    callback_url: "http://127.0.0.1:1/hubgate/oauth_callback".into(),
                    callback_path: "/hubgate/oauth_callback".into(),
                    authorize_url: "/hub/api/oauth2/authorize".into(),
                }),
                session_secrets: vec![SECRET.to_vec()],
                ephemeral_secret: false,
                identity_header: None,
                cookie_path: "/".into(),
                cookie_secure: false,
            },
        )
    })
}

/// base64url(sha256(data)), as the callback binds a state to its browser.
fn sha256_b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, data))
}

fuzz_target!(|input: Input| {
    let signer = Signer::new(&[SECRET.to_vec()]);
    let other = Signer::new(&[b"another-secret-of-at-least-32-bytes".to_vec()]);

    // Anything a browser could send.
    let _ = signer.check_session(&input.text);
    let _ = signer.verify_claims::<serde_json::Value>(&input.text);

    let who = Identity {
        name: input.who.name.clone(),
        admin: input.who.admin,
        groups: input.who.groups.clone(),
        scopes: input.who.scopes.clone(),
    };
    let lifetime = i64::from(input.lifetime.max(60));
    let lifetime = if input.expired { -lifetime } else { lifetime };
    let token = signer
        .session(&who, lifetime, input.hub_token.as_deref())
        .expect("signing works");
    match signer.check_session(&token) {
        SessionCheck::Valid { who: read, .. } if !input.expired => assert_eq!(*read, who),
        SessionCheck::Expired { name, token, .. } if input.expired => {
            assert_eq!(name, who.name);
            assert_eq!(token, input.hub_token);
        }
        other => panic!("a fresh session read as {other:?}"),
    }
    assert!(matches!(other.check_session(&token), SessionCheck::Invalid));

    let mut bytes = token.clone().into_bytes();
    let at = input.tamper_at % bytes.len();
    bytes[at] = input.tamper_with;
    if let Ok(tampered) = String::from_utf8(bytes) {
        match signer.check_session(&tampered) {
            SessionCheck::Valid { who: read, .. } => assert_eq!(*read, who, "a forged session"),
            SessionCheck::Expired { name, .. } => assert_eq!(name, who.name, "a forged session"),
            SessionCheck::Invalid => {}
        }
    }

    // The OAuth callback.
    let mut query = input.query.clone();
    let mut cookie = input.cookie.clone();
    let verifier = "fuzz-verifier";
    if let Some((next, matching)) = &input.state {
        let bind = sha256_b64(sha256_b64(verifier.as_bytes()).as_bytes());
        let state = signer
            .sign_claims(&serde_json::json!({
                "next": next,
                "bind": bind,
                "exp": 4_102_444_800i64,
            }))
            .expect("signing works");
        let code = if input.query.is_empty() {
            "c"
        } else {
            &input.query
        };
        query = form(&[("code", code), ("state", &state)]);
        if *matching {
            cookie = format!("{STATE_COOKIE}={verifier}").into_bytes();
        }
    }
    let Ok(uri) = http::Uri::try_from(format!("/hubgate/oauth_callback?{query}")) else {
        return;
    };
    let mut req = Request::get(uri);
    if let Ok(v) = http::HeaderValue::from_bytes(&cookie) {
        req = req.header(header::COOKIE, v);
    }
    let req = req.body(()).expect("a request");
    let genuine = input.state.is_some()
        && hubgate::auth::cookie(req.headers(), STATE_COOKIE).as_deref() == Some(verifier);
    let resp = runtime().block_on(auth().callback(&req));
    let status = resp.status();
    if genuine {
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub is unreachable"
        );
    } else {
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::FORBIDDEN,
            "a forged callback got {status}"
        );
    }
    assert!(resp.headers().get(header::LOCATION).is_none());
});

fn form(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        for b in v.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}
