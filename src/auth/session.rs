//! hubgate's own session cookie and the OAuth `state`: HS256-signed JWTs.
//!
//! The signing secrets are a list: the first signs, all verify, so a secret can be rotated by
//! putting the new one first and dropping the old one after a cookie lifetime. Replicas that share
//! the list accept each other's cookies without asking the hub.
//!
//! A JWT is signed, not encrypted: anyone holding the cookie can read its claims. The hub token a
//! session keeps for renewal is therefore sealed (ChaCha20-Poly1305, with a key derived from the
//! same secret by HKDF and the user's name as associated data), as oauth2-proxy seals the tokens
//! in its cookies: a cookie that leaks into a log or a proxy's trace gives away a session that
//! ends with the cache lifetime, not a hub token that outlives it.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::Identity;

/// The claims of a session cookie.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionClaims {
    sub: String,
    #[serde(default)]
    adm: bool,
    #[serde(default)]
    grp: Vec<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
    /// Issued at, milliseconds (revocations compare against it).
    iat_ms: i64,
    /// Expiry, seconds (checked by the JWT library).
    exp: i64,
    /// The hub token the session was made from (an OAuth access token, or a token a browser
    /// brought in its URL), sealed ([`Keys::seal`]). When the session expires it is checked with
    /// the hub again and the session renewed, so a browser is not sent through OAuth (and a new
    /// hub token made) at every cache lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etk: Option<String>,
}

/// What a session cookie turned out to be.
#[derive(Debug)]
pub enum SessionCheck {
    /// Signed by us and not expired.
    Valid { who: Arc<Identity>, issued_ms: i64 },
    /// Signed by us but expired; renewable when it carries a hub token the hub still accepts.
    Expired {
        name: String,
        issued_ms: i64,
        token: Option<String>,
    },
    /// Not ours, tampered with, or unreadable.
    Invalid,
}

/// The keys made from one secret: the JWT's signing keys and the key that seals hub tokens.
struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    sealing: LessSafeKey,
}

impl Keys {
    fn new(secret: &[u8]) -> Keys {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"hubgate").extract(secret);
        let okm = prk
            .expand(&[b"session hub token v1"], &aead::CHACHA20_POLY1305)
            .expect("32 bytes are within HKDF-SHA256's output limit");
        Keys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            sealing: LessSafeKey::new(UnboundKey::from(okm)),
        }
    }

    /// `token` sealed for `user`: base64url of a random nonce and the ciphertext with its tag.
    fn seal(&self, user: &str, token: &str) -> Option<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut sealed = token.as_bytes().to_vec();
        self.sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(user.as_bytes()),
                &mut sealed,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Some(URL_SAFE_NO_PAD.encode(out))
    }

    /// The token `seal` sealed for `user` with this key; `None` for anything else.
    fn open(&self, user: &str, sealed: &str) -> Option<String> {
        let raw = URL_SAFE_NO_PAD.decode(sealed).ok()?;
        let (nonce, ciphertext) = raw.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .sealing
            .open_in_place(nonce, Aad::from(user.as_bytes()), &mut buf)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

/// Signs and checks JWTs with a rotatable list of secrets.
pub struct Signer {
    /// Index 0 signs (and seals).
    keys: Vec<Keys>,
    validation: Validation,
    /// The same checks without the expiry, to recognise an expired session of ours.
    ignoring_expiry: Validation,
}

impl Signer {
    /// # Panics
    /// Never: an empty list is replaced by one random secret by the caller (config).
    pub fn new(secrets: &[Vec<u8>]) -> Self {
        let keys = secrets.iter().map(|s| Keys::new(s)).collect();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        let mut ignoring_expiry = validation.clone();
        ignoring_expiry.validate_exp = false;
        Signer {
            keys,
            validation,
            ignoring_expiry,
        }
    }

    fn sign<T: Serialize>(&self, claims: &T) -> Option<String> {
        let keys = self.keys.first()?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &keys.encoding).ok()
    }

    fn verify<T: DeserializeOwned>(&self, token: &str) -> Option<T> {
        self.verify_with(token, &self.validation)
    }

    fn verify_with<T: DeserializeOwned>(&self, token: &str, validation: &Validation) -> Option<T> {
        self.keys
            .iter()
            .find_map(|keys| jsonwebtoken::decode::<T>(token, &keys.decoding, validation).ok())
            .map(|data| data.claims)
    }

    /// A session token for this identity, valid for `lifetime_secs`, carrying the hub token it
    /// was made from (if any) for renewal.
    pub fn session(
        &self,
        who: &Identity,
        lifetime_secs: i64,
        hub_token: Option<&str>,
    ) -> Option<String> {
        let now = chrono::Utc::now();
        let etk = match hub_token {
            // A token that cannot be sealed is not written in the clear: no session then.
            Some(token) => Some(self.keys.first()?.seal(&who.name, token)?),
            None => None,
        };
        self.sign(&SessionClaims {
            sub: who.name.clone(),
            adm: who.admin,
            grp: who.groups.clone(),
            scp: who.scopes.clone(),
            iat_ms: now.timestamp_millis(),
            exp: now.timestamp() + lifetime_secs,
            etk,
        })
    }

    /// Reads a session token.
    pub fn check_session(&self, token: &str) -> SessionCheck {
        if let Some(c) = self.verify::<SessionClaims>(token) {
            let who = Identity {
                name: c.sub,
                admin: c.adm,
                groups: c.grp,
                scopes: c.scp,
            };
            return SessionCheck::Valid {
                who: Arc::new(who),
                issued_ms: c.iat_ms,
            };
        }
        match self.verify_with::<SessionClaims>(token, &self.ignoring_expiry) {
            Some(c) => SessionCheck::Expired {
                // Sealed with whichever secret signed it; one that opens with none is no token.
                token: c.etk.and_then(|sealed| {
                    self.keys.iter().find_map(|keys| keys.open(&c.sub, &sealed))
                }),
                name: c.sub,
                issued_ms: c.iat_ms,
            },
            None => SessionCheck::Invalid,
        }
    }

    /// Signs any claims (for the OAuth state).
    pub fn sign_claims<T: Serialize>(&self, claims: &T) -> Option<String> {
        self.sign(claims)
    }

    /// Checks any claims (for the OAuth state).
    pub fn verify_claims<T: DeserializeOwned>(&self, token: &str) -> Option<T> {
        self.verify(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Identity {
        Identity {
            name: "alice".into(),
            admin: false,
            groups: vec!["g".into()],
            scopes: Some(vec!["access:servers!user=alice".into()]),
        }
    }

    #[test]
    fn sessions_round_trip_and_rotate() {
        let old = Signer::new(&[b"old-secret".to_vec()]);
        let token = old.session(&alice(), 60, None).unwrap();
        let SessionCheck::Valid { who, .. } = old.check_session(&token) else {
            panic!("a fresh session is valid")
        };
        assert_eq!(*who, alice());

        let rotated = Signer::new(&[b"new-secret".to_vec(), b"old-secret".to_vec()]);
        let valid = |s: &Signer, t: &str| matches!(s.check_session(t), SessionCheck::Valid { .. });
        assert!(valid(&rotated, &token), "old cookies still verify");
        let fresh = rotated.session(&alice(), 60, None).unwrap();
        assert!(
            !valid(&old, &fresh),
            "new cookies are signed with the new secret"
        );

        let other = Signer::new(&[b"someone-else".to_vec()]);
        assert!(matches!(other.check_session(&token), SessionCheck::Invalid));
    }

    /// The claims of a JWT, read without checking it (as anyone holding the cookie can).
    fn claims_of(jwt: &str) -> String {
        let payload = jwt.split('.').nth(1).unwrap();
        String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
    }

    #[test]
    fn the_hub_token_is_sealed_and_opens_only_for_its_user_and_secrets() {
        let s = Signer::new(&[b"k".to_vec()]);
        let expired = s.session(&alice(), -10, Some("hub-token-123")).unwrap();
        let claims = claims_of(&expired);
        assert!(!claims.contains("hub-token-123"), "readable: {claims}");

        // Rotation: still opened with the old secret listed second.
        let rotated = Signer::new(&[b"new".to_vec(), b"k".to_vec()]);
        let SessionCheck::Expired { token, .. } = rotated.check_session(&expired) else {
            panic!("expected an expired session")
        };
        assert_eq!(token.as_deref(), Some("hub-token-123"));

        // Sealed for alice: opened for anyone else (or tampered with), it is no token.
        let keys = Keys::new(b"k");
        let sealed = keys.seal("alice", "hub-token-123").unwrap();
        assert_eq!(
            keys.open("alice", &sealed).as_deref(),
            Some("hub-token-123")
        );
        assert_eq!(keys.open("mallory", &sealed), None);
        let mut flipped = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(keys.open("alice", &URL_SAFE_NO_PAD.encode(flipped)), None);
        assert_eq!(Keys::new(b"other").open("alice", &sealed), None);
        assert_eq!(keys.open("alice", "short"), None);
        assert_ne!(
            sealed,
            keys.seal("alice", "hub-token-123").unwrap(),
            "fresh nonces"
        );
    }

    #[test]
    fn expired_sessions_are_told_apart_from_forged_ones() {
        let s = Signer::new(&[b"k".to_vec()]);
        let expired = s.session(&alice(), -10, Some("hub-token")).unwrap();
        match s.check_session(&expired) {
            SessionCheck::Expired { name, token, .. } => {
                assert_eq!(name, "alice");
                assert_eq!(token.as_deref(), Some("hub-token"));
            }
            other => panic!("expected an expired session, got {other:?}"),
        }
        let invalid = |t: &str| matches!(s.check_session(t), SessionCheck::Invalid);
        let token = s.session(&alice(), 60, None).unwrap();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert!(invalid(&parts.join(".")));
        assert!(invalid("not-a-jwt"));
        // A token whose header asks for "none" is not accepted.
        let unsigned = format!("eyJhbGciOiJub25lIn0.{}.", token.split('.').nth(1).unwrap());
        assert!(invalid(&unsigned));
        // Nor is an expired one signed by someone else.
        let other = Signer::new(&[b"other".to_vec()])
            .session(&alice(), -10, Some("t"))
            .unwrap();
        assert!(invalid(&other));
    }
}
