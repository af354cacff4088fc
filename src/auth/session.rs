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
}

/// Signs and checks JWTs with a rotatable list of secrets.
pub struct Signer {
    /// Index 0 signs.
    keys: Vec<(EncodingKey, DecodingKey)>,
    validation: Validation,
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
        Signer { keys, validation }
    }

    fn sign<T: Serialize>(&self, claims: &T) -> Option<String> {
        let (key, _) = self.keys.first()?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, key).ok()
    }

    fn verify<T: DeserializeOwned>(&self, token: &str) -> Option<T> {
        self.keys
            .iter()
            .find_map(|(_, key)| jsonwebtoken::decode::<T>(token, key, &self.validation).ok())
            .map(|data| data.claims)
    }

    /// A session token for this identity, valid for `lifetime_secs`.
    pub fn session(&self, who: &Identity, lifetime_secs: i64) -> Option<String> {
        let now = chrono::Utc::now();
        self.sign(&SessionClaims {
            sub: who.name.clone(),
            adm: who.admin,
            grp: who.groups.clone(),
            scp: who.scopes.clone(),
            iat_ms: now.timestamp_millis(),
            exp: now.timestamp() + lifetime_secs,
        })
    }

    /// The identity in a session token and when it was issued (ms), if the signature is good
    /// and it has not expired.
    pub fn check_session(&self, token: &str) -> Option<(Arc<Identity>, i64)> {
        let c: SessionClaims = self.verify(token)?;
        let who = Identity {
            name: c.sub,
            admin: c.adm,
            groups: c.grp,
            scopes: c.scp,
        };
        Some((Arc::new(who), c.iat_ms))
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
        let token = old.session(&alice(), 60).unwrap();
        let (who, _) = old.check_session(&token).unwrap();
        assert_eq!(*who, alice());

        let rotated = Signer::new(&[b"new-secret".to_vec(), b"old-secret".to_vec()]);
        assert!(
            rotated.check_session(&token).is_some(),
            "old cookies still verify"
        );
        let fresh = rotated.session(&alice(), 60).unwrap();
        assert!(
            old.check_session(&fresh).is_none(),
            "new cookies are signed with the new secret"
        );

        let other = Signer::new(&[b"someone-else".to_vec()]);
        assert!(other.check_session(&token).is_none());
    }

    #[test]
    fn expired_or_tampered_sessions_are_refused() {
        let s = Signer::new(&[b"k".to_vec()]);
        let expired = s.session(&alice(), -10).unwrap();
        assert!(s.check_session(&expired).is_none());
        let token = s.session(&alice(), 60).unwrap();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert!(s.check_session(&parts.join(".")).is_none());
        assert!(s.check_session("not-a-jwt").is_none());
        // A token whose header asks for "none" is not accepted.
        let unsigned = format!("eyJhbGciOiJub25lIn0.{}.", token.split('.').nth(1).unwrap());
        assert!(s.check_session(&unsigned).is_none());
    }
}
