//! hubgate as an OAuth client of the hub, for browsers that arrive without credentials.
//!
//! The browser is sent to the hub's `oauth2/authorize` with a signed, expiring `state` that carries
//! the URL it wanted; the hub sends it back to hubgate's callback with a code, which hubgate trades
//! for a token (`oauth2/token`), asks the hub who that is (`GET /user`), sets its own session
//! cookie and redirects to the original URL. The flow uses PKCE (S256), and the state is bound to
//! the browser by a cookie holding the PKCE verifier, so a state replayed from another browser (or
//! a forged callback link) is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::{cookie, redirect, refusal, Auth, Identity};
use crate::http::{ConnInfo, ProxyBody};

/// The cookie holding the PKCE verifier while a login is under way.
pub const STATE_COOKIE: &str = "hubgate-oauth-state";

/// How long a login may take between the redirect and the callback.
const STATE_LIFETIME_SECS: i64 = 600;

/// OAuth client settings.
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    /// As the hub registered hubgate (JUPYTERHUB_CLIENT_ID, e.g. `service-hubgate`).
    pub client_id: String,
    /// As registered with the hub (JUPYTERHUB_OAUTH_CALLBACK_URL).
    pub callback_url: String,
    /// The path part of `callback_url`, which hubgate answers itself.
    pub callback_path: String,
    /// Where browsers are sent to authorize, e.g. `/hub/api/oauth2/authorize`.
    pub authorize_url: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    /// Where to go after login: a local path.
    next: String,
    /// SHA-256 of the PKCE verifier in the browser's state cookie.
    bind: String,
    exp: i64,
}

impl Auth {
    /// Whether this path is hubgate's OAuth callback.
    pub fn is_callback(&self, path: &str) -> bool {
        self.settings
            .oauth
            .as_ref()
            .is_some_and(|o| o.callback_path == path)
    }

    /// Sends a browser to the hub to log in, remembering `next`.
    pub(super) fn oauth_redirect(&self, next: &str, secure: bool) -> Option<Response<ProxyBody>> {
        let oauth = self.settings.oauth.as_ref()?;
        let mut raw = [0u8; 32];
        SystemRandom::new().fill(&mut raw).ok()?;
        let verifier = URL_SAFE_NO_PAD.encode(raw);
        let challenge = URL_SAFE_NO_PAD.encode(sha256(verifier.as_bytes()));
        let state = self.signer.sign_claims(&State {
            next: next.to_owned(),
            bind: URL_SAFE_NO_PAD.encode(sha256(challenge.as_bytes())),
            exp: chrono::Utc::now().timestamp() + STATE_LIFETIME_SECS,
        })?;
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &oauth.client_id)
            .append_pair("redirect_uri", &oauth.callback_url)
            .append_pair("response_type", "code")
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .finish();
        let cookie = HeaderValue::from_str(&format!(
            "{STATE_COOKIE}={verifier}; Path={}; Max-Age={STATE_LIFETIME_SECS}; HttpOnly; SameSite=Lax{}",
            oauth.callback_path,
            if secure { "; Secure" } else { "" }
        ))
        .ok()?;
        Some(redirect(
            &format!("{}?{query}", oauth.authorize_url),
            Some(cookie),
        ))
    }

    /// Answers the hub's redirect back to hubgate: checks the state, trades the code, sets the
    /// session cookie and sends the browser where it was going.
    pub async fn callback<B>(&self, req: &Request<B>, conn: &ConnInfo) -> Response<ProxyBody> {
        let Some(oauth) = &self.settings.oauth else {
            return refusal(StatusCode::NOT_FOUND, "OAuth is not configured.", true);
        };
        let params: Vec<(String, String)> =
            form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some(error) = param("error") {
            tracing::info!(error = %error, "the hub refused the login");
            return refusal(
                StatusCode::FORBIDDEN,
                "The hub did not authorize this login.",
                true,
            );
        }
        let (Some(code), Some(state)) = (param("code"), param("state")) else {
            return refusal(
                StatusCode::BAD_REQUEST,
                "The login callback lacks its code or state.",
                true,
            );
        };
        let Some(state) = self.signer.verify_claims::<State>(state) else {
            tracing::warn!("OAuth callback with a bad or expired state");
            return refusal(
                StatusCode::BAD_REQUEST,
                "This login link is invalid or has expired; start again.",
                true,
            );
        };
        let Some(verifier) = cookie(req.headers(), STATE_COOKIE) else {
            tracing::warn!("OAuth callback without the state cookie");
            return refusal(
                StatusCode::BAD_REQUEST,
                "This login was started in another browser; start again.",
                true,
            );
        };
        let challenge = URL_SAFE_NO_PAD.encode(sha256(verifier.as_bytes()));
        if URL_SAFE_NO_PAD.encode(sha256(challenge.as_bytes())) != state.bind {
            tracing::warn!("OAuth callback whose state does not match this browser");
            return refusal(
                StatusCode::BAD_REQUEST,
                "This login was started in another browser; start again.",
                true,
            );
        }

        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &oauth.client_id)
            .append_pair("client_secret", self.hub_token())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", &oauth.callback_url)
            .append_pair("code_verifier", &verifier)
            .finish();
        let user = match self.hub.exchange_code(form).await {
            Ok(Some(token)) => self
                .hub
                .user_for_token(&token)
                .await
                .map(|u| u.map(|u| (u, token))),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let (who, token) = match user {
            Ok(Some((user, token))) => (Identity::from_hub(user), token),
            Ok(None) => {
                return refusal(
                    StatusCode::FORBIDDEN,
                    "The hub did not accept this login.",
                    true,
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "hub unavailable during login");
                return refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The hub cannot complete the login right now; try again shortly.",
                    true,
                );
            }
        };
        tracing::info!(user = %who.name, "logged in through the hub");
        let Some(session) = self.session_cookie(&who, Some(&token), self.secure(conn)) else {
            return refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Could not create a session.",
                true,
            );
        };
        let mut resp = redirect(safe_next(&state.next), Some(session));
        let clear = format!(
            "{STATE_COOKIE}=; Path={}; Max-Age=0; HttpOnly; SameSite=Lax",
            oauth.callback_path
        );
        if let Ok(v) = HeaderValue::from_str(&clear) {
            resp.headers_mut().append(http::header::SET_COOKIE, v);
        }
        resp
    }

    fn hub_token(&self) -> &str {
        self.hub.token().unwrap_or_default()
    }
}

/// Only local paths: `//evil.example/` or `https://evil.example/` would make the callback an
/// open redirect. Browsers drop tabs and newlines from a `Location` before reading it
/// (`/<tab>/evil.example` is `//evil.example` to them), so a path with any control character or
/// space is refused too (hubgate's own `next` comes from a parsed request target, which has none).
pub fn safe_next(next: &str) -> &str {
    let plain = !next.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if plain && next.starts_with('/') && !next.starts_with("//") && !next.starts_with("/\\") {
        next
    } else {
        "/"
    }
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed() {
        assert_eq!(safe_next("/user/alice/lab?x=1"), "/user/alice/lab?x=1");
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("https://evil.example/"), "/");
        assert_eq!(safe_next("/\\evil.example"), "/");
    }

    /// Found by fuzzing (fuzz/fuzz_targets/credentials.rs): a browser removes the tab from
    /// `/<tab>/evil.example` and goes to `//evil.example`.
    #[test]
    fn paths_a_browser_would_rewrite_are_not_followed() {
        for next in [
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r\n/x",
            "/ /x",
            "/\t\\evil",
        ] {
            assert_eq!(safe_next(next), "/", "{next:?}");
        }
        assert_eq!(safe_next("/user/a%20b/?x=%09"), "/user/a%20b/?x=%09");
    }
}
