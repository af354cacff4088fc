//! hubgate's own session cookie and the OAuth `state`: HS256-signed JWTs.
//!
//! The signing secrets are a list: the first signs, all verify, so a secret can be rotated by
//! putting the new one first and dropping the old one after a cookie lifetime. Replicas that share
//! the list accept each other's cookies without asking the hub.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
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
    /// brought in its URL). When the session expires it is checked with the hub again and the
    /// session renewed, so a browser is not sent through OAuth (and a new hub token made) at
    /// every cache lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tok: Option<String>,
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

/// Signs and checks JWTs with a rotatable list of secrets.
pub struct Signer {
    /// Index 0 signs.
    keys: Vec<(EncodingKey, DecodingKey)>,
    validation: Validation,
    /// The same checks without the expiry, to recognise an expired session of ours.
    ignoring_expiry: Validation,
}

impl Signer {
    /// # Panics
    /// Never: an empty list is replaced by one random secret by the caller (config).
    pub fn new(secrets: &[Vec<u8>]) -> Self {
        let keys = secrets
            .iter()
            .map(|s| (EncodingKey::from_secret(s), DecodingKey::from_secret(s)))
            .collect();
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
        let (key, _) = self.keys.first()?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key).ok()
    }

    fn verify<T: DeserializeOwned>(&self, token: &str) -> Option<T> {
        self.verify_with(token, &self.validation)
    }

    fn verify_with<T: DeserializeOwned>(&self, token: &str, validation: &Validation) -> Option<T> {
        self.keys
            .iter()
            .find_map(|(_, key)| jsonwebtoken::decode::<T>(token, key, validation).ok())
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
        self.sign(&SessionClaims {
            sub: who.name.clone(),
            adm: who.admin,
            grp: who.groups.clone(),
            scp: who.scopes.clone(),
            iat_ms: now.timestamp_millis(),
            exp: now.timestamp() + lifetime_secs,
            tok: hub_token.map(str::to_owned),
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
                name: c.sub,
                issued_ms: c.iat_ms,
                token: c.tok,
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
