//! JSON Web Tokens (SPEC §4 "JWT", §6 step 3).
//!
//! Owns the configured verification keys and the checks on a compact JWS:
//! key chosen by `kid`, `alg` pinned to that key (no `none`, no switching,
//! `jku`/`x5u`/`jwk`/`x5c` header keys are never used), signature first,
//! then `exp` (required), `nbf`, `iat`, `iss`, `aud` in the order SPEC §6
//! lists, then the `cube`/`cubes` claim. Claims are only read after the
//! signature verifies, so nothing an attacker writes is trusted before that.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use http::HeaderValue;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use sha2::Digest;

use super::{AuthError, Principal, is_safe_identity};
use crate::scope::{Cube, CubeSpec, Strictness, Vocabulary, cube_list};

/// One verification key.
pub struct JwtKey {
    pub kid: Box<str>,
    pub alg: Algorithm,
    key: DecodingKey,
    /// 0 for configured keys; for JWKS keys a hash of the JWK, so a cached
    /// token is dropped when its key is removed or replaced under its kid.
    pub serial: u64,
}

impl std::fmt::Debug for JwtKey {
    // The key material (an HMAC secret in particular) is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

/// The algorithms a key may be configured with.
pub fn parse_alg(s: &str) -> Result<Algorithm, String> {
    let alg = match s {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other => {
            return Err(format!(
                "unknown alg `{other}` (expected HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)"
            ));
        }
    };
    Ok(alg)
}

pub fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// DER encodings of the named-curve OIDs, to check an EC key fits its alg.
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

fn pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.trim().chars())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl JwtKey {
    /// An asymmetric key from a PEM public key (or certificate), checked
    /// against `alg`.
    pub fn from_pem(kid: &str, alg: Algorithm, pem: &[u8]) -> Result<JwtKey, String> {
        let key = match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                let key = DecodingKey::from_ec_pem(pem)
                    .map_err(|e| format!("not an EC public key in PEM ({e})"))?;
                let der = pem_der(pem).ok_or("PEM body is not base64")?;
                let (want, name) = if alg == Algorithm::ES256 {
                    (OID_P256, "P-256")
                } else {
                    (OID_P384, "P-384")
                };
                if !contains(&der, want) {
                    return Err(format!(
                        "{alg:?} needs a {name} key; this key is on another curve"
                    ));
                }
                key
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem)
                .map_err(|e| format!("not an RSA public key in PEM ({e})"))?,
            Algorithm::EdDSA => DecodingKey::from_ed_pem(pem)
                .map_err(|e| format!("not an Ed25519 public key in PEM ({e})"))?,
            _ => return Err(format!("{alg:?} takes `secret_env`, not `public_key`")),
        };
        Ok(JwtKey {
            kid: kid.into(),
            alg,
            key,
            serial: 0,
        })
    }

    /// A key from a JWK whose `alg` the caller has already pinned (see
    /// [`super::jwks`]). EC coordinates must have the curve's length.
    pub fn from_jwk(
        kid: &str,
        alg: Algorithm,
        jwk: &jsonwebtoken::jwk::Jwk,
        serial: u64,
    ) -> Result<JwtKey, String> {
        use jsonwebtoken::jwk::AlgorithmParameters;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let coord_len = |c: &str| b64.decode(c).map(|v| v.len()).unwrap_or(0);
        match (&jwk.algorithm, alg) {
            (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256 | Algorithm::ES384) => {
                let want = if alg == Algorithm::ES256 { 32 } else { 48 };
                if coord_len(&p.x) != want || coord_len(&p.y) != want {
                    return Err(format!("{alg:?} coordinates must be {want} bytes"));
                }
            }
            (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
                if coord_len(&p.x) != 32 {
                    return Err("an Ed25519 key must be 32 bytes".into());
                }
            }
            (AlgorithmParameters::RSA(p), _) if !is_hmac(alg) => {
                // 2048 bits at least, as for PEM keys in practice.
                if coord_len(&p.n) < 256 {
                    return Err("RSA keys must be at least 2048 bits".into());
                }
            }
            _ => return Err(format!("the key does not fit {alg:?}")),
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key ({e})"))?;
        Ok(JwtKey {
            kid: kid.into(),
            alg,
            key,
            serial,
        })
    }

    /// Whether `signature` (base64url) verifies `message` with this key:
    /// the one signature check of the request path (tests/wycheproof.rs
    /// holds it to Project Wycheproof's edge cases).
    pub fn verify(&self, signature: &str, message: &[u8]) -> bool {
        jsonwebtoken::crypto::verify(signature, message, &self.key, self.alg).unwrap_or(false)
    }

    /// An HMAC key from its secret. Secrets shorter than 32 bytes are refused:
    /// they are guessable offline from any one token.
    pub fn from_secret(kid: &str, alg: Algorithm, secret: &[u8]) -> Result<JwtKey, String> {
        if !is_hmac(alg) {
            return Err(format!("{alg:?} takes `public_key`, not `secret_env`"));
        }
        if secret.len() < 32 {
            return Err(format!(
                "the secret is {} bytes; HMAC secrets must be at least 32 bytes",
                secret.len()
            ));
        }
        Ok(JwtKey {
            kid: kid.into(),
            alg,
            key: DecodingKey::from_secret(secret),
            serial: 0,
        })
    }
}

/// `aud` may be one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Claims {
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    iss: Option<String>,
    aud: Option<Audience>,
    sub: Option<String>,
    jti: Option<String>,
    cube: Option<CubeSpec>,
    cubes: Option<Vec<CubeSpec>>,
    /// OAuth-style scope strings, bounded by `tenants` and `accounts`.
    scope: Option<String>,
    tenants: Option<Vec<String>>,
    accounts: Option<Vec<String>>,
}

/// A JWT that verified, with its cubes compiled against one snapshot.
#[derive(Debug)]
pub struct VerifiedJwt {
    pub token_id: Box<str>,
    pub subject: Option<Box<str>>,
    /// `token_id` and `subject` as the identity header values, made once
    /// per verification: a cache hit then forwards them for a reference
    /// count instead of a check, an allocation and a copy each.
    pub(super) token_id_header: Option<HeaderValue>,
    pub(super) subject_header: Option<HeaderValue>,
    pub cubes: Box<[Cube]>,
    /// For a token verified with a JWKS key: its kid and serial, checked
    /// again on every cache hit.
    jwks_key: Option<(Box<str>, u64)>,
    /// The token is accepted while `valid_from <= now < valid_until`
    /// (its `nbf`/`iat` and `exp`, widened by the leeway).
    valid_from: f64,
    valid_until: f64,
    /// The token's own `exp` (Unix seconds).
    pub exp: f64,
}

/// Verified tokens by the SHA-256 of their bytes. It lives in the snapshot,
/// so a new generation (new keys, new names) starts with an empty one; a
/// hit is only used inside the token's own validity window; only
/// successful verifications are kept.
pub type JwtCache = quick_cache::sync::Cache<[u8; 32], Arc<VerifiedJwt>>;

/// All JWT settings of one snapshot.
#[derive(Debug, Default)]
pub struct JwtKeys {
    pub keys: HashMap<Box<str>, JwtKey>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: i64,
    /// `None` when `tokens.jwt.cache_size` is 0.
    pub cache: Option<JwtCache>,
    /// `tokens.jwt.jwks`: consulted for a kid that is not configured here.
    pub jwks: Option<Arc<super::jwks::Jwks>>,
}

impl JwtKeys {
    /// Verify a compact JWS and compile its cubes, or find it already
    /// verified in the cache. `now` is Unix seconds.
    pub fn authenticate(
        &self,
        token: &str,
        now: i64,
        vocab: &Vocabulary<'_>,
    ) -> Result<Principal<'static>, AuthError> {
        let Some(cache) = &self.cache else {
            return self.verify(token, now, vocab).map(Principal::Jwt);
        };
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let t = now as f64;
        if let Some(hit) = cache.get(&key) {
            let key_still_there = match (&hit.jwks_key, &self.jwks) {
                (None, _) => true,
                (Some((kid, serial)), Some(jwks)) => jwks.still_has(kid, *serial),
                (Some(_), None) => false,
            };
            if key_still_there && hit.valid_from <= t && t < hit.valid_until {
                return Ok(Principal::Jwt(hit));
            }
            // Out of its window: verify again, which names the reason.
            cache.remove(&key);
        }
        let verified = self.verify(token, now, vocab)?;
        cache.insert(key, verified.clone());
        Ok(Principal::Jwt(verified))
    }

    /// The full verification, no cache.
    fn verify(
        &self,
        token: &str,
        now: i64,
        vocab: &Vocabulary<'_>,
    ) -> Result<Arc<VerifiedJwt>, AuthError> {
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        // (jsonwebtoken refuses a header that is not UTF-8; a test pins it.)
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        // RFC 7515 §4.1.11: we understand no extension, so any `crit` is refused.
        if header.crit.is_some() {
            return Err(AuthError::Malformed);
        }
        let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
        // Configured keys first, then the JWKS (which may not have loaded).
        let set;
        let (key, jwks_key) = match (self.keys.get(kid), &self.jwks) {
            (Some(k), _) => (k, None),
            (None, None) => return Err(AuthError::UnknownKey),
            (None, Some(jwks)) => {
                set = jwks.current().ok_or(AuthError::KeySourceUnavailable)?;
                let k = set.keys.get(kid).ok_or(AuthError::UnknownKey)?;
                (k, Some((Box::<str>::from(kid), k.serial)))
            }
        };
        if header.alg != key.alg {
            return Err(AuthError::BadSignature);
        }
        let message_len = h64.len() + 1 + p64.len();
        let message = token
            .as_bytes()
            .get(..message_len)
            .ok_or(AuthError::Malformed)?;
        if !key.verify(s64, message) {
            return Err(AuthError::BadSignature);
        }

        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p64)
            .map_err(|_| AuthError::Malformed)?;
        // RFC 7519: the claims are UTF-8 JSON. serde skips unknown members
        // without checking their strings, so a payload with invalid UTF-8 in
        // an ignored member would otherwise pass (found by the jwt_claims
        // fuzz target): check the whole text first.
        let payload = std::str::from_utf8(&payload).map_err(|_| AuthError::Malformed)?;
        let claims: Claims = serde_json::from_str(payload).map_err(|_| AuthError::Malformed)?;

        let leeway = self.leeway as f64;
        let now = now as f64;
        let exp = claims.exp.ok_or(AuthError::Malformed)?;
        if now >= exp + leeway {
            return Err(AuthError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + leeway) {
            return Err(AuthError::NotYetValid);
        }
        if claims.iat.is_some_and(|iat| iat > now + leeway) {
            return Err(AuthError::NotYetValid);
        }
        if let Some(want) = &self.issuer
            && claims.iss.as_deref() != Some(want.as_str())
        {
            return Err(AuthError::WrongIssuer);
        }
        if let Some(want) = &self.audience {
            let ok = match &claims.aud {
                Some(Audience::One(a)) => a == want,
                Some(Audience::Many(list)) => list.iter().any(|a| a == want),
                None => false,
            };
            if !ok {
                return Err(AuthError::WrongAudience);
            }
        }

        // Exactly one of `cube`, `cubes` and `scope`.
        let from_scope;
        let specs = match &claims.scope {
            Some(scope) if claims.cube.is_none() && claims.cubes.is_none() => {
                from_scope = crate::scope::scope_cubes(
                    scope,
                    claims.tenants.as_deref().unwrap_or_default(),
                    claims.accounts.as_deref().unwrap_or_default(),
                    vocab.roles,
                );
                &from_scope[..]
            }
            Some(_) => return Err(AuthError::Malformed),
            None => cube_list(&claims.cube, &claims.cubes).map_err(|_| AuthError::Malformed)?,
        };
        let cubes = specs
            .iter()
            .map(|s| s.compile(vocab, Strictness::Claims))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| AuthError::Malformed)?;
        if let Some(sub) = &claims.sub
            && !is_safe_identity(sub)
        {
            return Err(AuthError::Malformed);
        }
        let token_id = claims
            .jti
            .or_else(|| claims.sub.clone())
            .ok_or(AuthError::Malformed)?;
        if !is_safe_identity(&token_id) {
            return Err(AuthError::Malformed);
        }
        let valid_from = claims
            .nbf
            .into_iter()
            .chain(claims.iat)
            .fold(f64::NEG_INFINITY, f64::max)
            - leeway;
        Ok(Arc::new(VerifiedJwt {
            token_id_header: HeaderValue::from_str(&token_id).ok(),
            subject_header: claims
                .sub
                .as_deref()
                .and_then(|s| HeaderValue::from_str(s).ok()),
            token_id: token_id.into(),
            subject: claims.sub.map(String::into_boxed_str),
            cubes: cubes.into_boxed_slice(),
            jwks_key,
            valid_from,
            valid_until: exp + leeway,
            exp,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Vocabulary;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &[u8] = b"unit-test-hs256-secret-0123456789abcdef";

    fn keys(cache: bool) -> JwtKeys {
        let mut k = JwtKeys {
            leeway: 10,
            cache: cache.then(|| JwtCache::new(16)),
            ..Default::default()
        };
        k.keys.insert(
            "k".into(),
            JwtKey::from_secret("k", Algorithm::HS256, SECRET).expect("key"),
        );
        k
    }

    fn token(claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k".into());
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(SECRET)).expect("sign")
    }

    /// A vocabulary with no names: these tests grant by method only.
    fn vocab() -> Vocabulary<'static> {
        static EMPTY: std::sync::LazyLock<HashMap<Box<str>, u32>> =
            std::sync::LazyLock::new(HashMap::new);
        static NO_ROLES: std::sync::LazyLock<HashMap<Box<str>, crate::scope::RoleSpec>> =
            std::sync::LazyLock::new(HashMap::new);
        static NO_NAMES: std::sync::LazyLock<crate::config::NameIds<u32>> =
            std::sync::LazyLock::new(Default::default);
        Vocabulary {
            tags: &EMPTY,
            routes: &EMPTY,
            tenants: &NO_NAMES,
            accounts: &NO_NAMES,
            roles: &NO_ROLES,
        }
    }

    #[test]
    fn a_cached_token_is_served_only_inside_its_window() {
        let v = vocab();
        let k = keys(true);
        let t = token(
            serde_json::json!({"jti": "j", "nbf": 1000, "exp": 2000, "cube": {"methods": ["GET"]}}),
        );
        // Before nbf - leeway: refused, and nothing is cached.
        assert_eq!(
            k.authenticate(&t, 980, &v).err(),
            Some(AuthError::NotYetValid)
        );
        assert_eq!(k.cache.as_ref().map(|c| c.len()), Some(0));
        let first = match k.authenticate(&t, 995, &v) {
            Ok(Principal::Jwt(j)) => j,
            other => panic!("{other:?}"),
        };
        // A hit is the same verified entry, not a second verification: from
        // the first second of the window (nbf - leeway) to its last
        // (exp + leeway - 1).
        for at in [995, 990, 1500, 2009] {
            match k.authenticate(&t, at, &v) {
                Ok(Principal::Jwt(j)) => assert!(Arc::ptr_eq(&first, &j), "not a hit at {at}"),
                other => panic!("{other:?}"),
            }
        }
        // At exp + leeway: expired.
        assert_eq!(k.authenticate(&t, 2010, &v).err(), Some(AuthError::Expired));
        // A clock stepping back before the window is refused too.
        assert!(k.authenticate(&t, 1500, &v).is_ok());
        assert_eq!(
            k.authenticate(&t, 900, &v).err(),
            Some(AuthError::NotYetValid)
        );
    }

    /// A token verified with a JWKS key is served from the cache while the
    /// set still holds that key, and verified afresh (so refused) once a
    /// newer set dropped the key or put other material under its kid.
    #[test]
    fn a_cached_jwks_token_lives_only_as_long_as_its_key() {
        use crate::token::jwks::tests::settings;
        use crate::token::jwks::{Jwks, JwksLocation, parse};
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let pair = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let set = |keys: &[(&str, &rcgen::KeyPair)]| {
            let keys: Vec<_> = keys
                .iter()
                .map(|(kid, p)| {
                    let point = p.public_key_raw();
                    serde_json::json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
                        "x": b64(&point[1..33]), "y": b64(&point[33..65])})
                })
                .collect();
            parse(serde_json::json!({ "keys": keys }).to_string().as_bytes()).expect("set")
        };
        let source = |keys: &[(&str, &rcgen::KeyPair)]| {
            let settings = settings(JwksLocation::File("jwks.json".into()));
            Jwks::new(settings, Some(set(keys))).expect("source")
        };
        let (one, other) = (pair(), pair());
        let jwks = Arc::new(source(&[("j1", &one)]));
        let k = JwtKeys {
            leeway: 10,
            cache: Some(JwtCache::new(16)),
            jwks: Some(jwks.clone()),
            ..Default::default()
        };
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("j1".into());
        let claims = serde_json::json!({"jti": "j", "exp": 2000, "cube": {"methods": ["GET"]}});
        let t = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_der(&one.serialize_der()))
            .expect("sign");
        let v = vocab();
        let first = match k.authenticate(&t, 1000, &v) {
            Ok(Principal::Jwt(j)) => j,
            other => panic!("{other:?}"),
        };
        // A newer set with the same key: still a hit.
        jwks.adopt(&source(&[("j1", &one), ("j2", &other)]));
        match k.authenticate(&t, 1001, &v) {
            Ok(Principal::Jwt(j)) => assert!(Arc::ptr_eq(&first, &j), "not a hit"),
            other => panic!("{other:?}"),
        }
        // Other material under the same kid: the signature no longer holds.
        jwks.adopt(&source(&[("j1", &other)]));
        assert_eq!(
            k.authenticate(&t, 1002, &v).err(),
            Some(AuthError::BadSignature)
        );
        // Back to the first key, then the kid is gone altogether.
        jwks.adopt(&source(&[("j1", &one)]));
        assert!(k.authenticate(&t, 1003, &v).is_ok());
        jwks.adopt(&source(&[("j2", &other)]));
        assert_eq!(
            k.authenticate(&t, 1004, &v).err(),
            Some(AuthError::UnknownKey)
        );
    }

    #[test]
    fn claims_and_headers_must_be_utf8_json_even_in_ignored_members() {
        // The fuzz finding: a validly signed token whose claims carry a
        // non-UTF-8 byte inside a member we do not read.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let k = keys(false);
        let sign = |header: &[u8], payload: &[u8]| {
            let msg = format!("{}.{}", b64.encode(header), b64.encode(payload));
            let sig = jsonwebtoken::crypto::sign(
                msg.as_bytes(),
                &jsonwebtoken::EncodingKey::from_secret(SECRET),
                Algorithm::HS256,
            )
            .expect("sign");
            format!("{msg}.{sig}")
        };
        let header = br#"{"alg":"HS256","kid":"k"}"#;
        let good = br#"{"jti":"j","exp":2000,"x":"y","cube":{"methods":["GET"]}}"#;
        assert!(k.authenticate(&sign(header, good), 1000, &vocab()).is_ok());
        let bad_claims =
            b"{\"jti\":\"j\",\"exp\":2000,\"x\":\"\x89\",\"cube\":{\"methods\":[\"GET\"]}}";
        assert_eq!(
            k.authenticate(&sign(header, bad_claims), 1000, &vocab())
                .err(),
            Some(AuthError::Malformed)
        );
        let bad_header = b"{\"alg\":\"HS256\",\"kid\":\"k\",\"x\":\"\xff\"}";
        assert_eq!(
            k.authenticate(&sign(bad_header, good), 1000, &vocab())
                .err(),
            Some(AuthError::Malformed)
        );
    }

    #[test]
    fn failures_are_never_cached_and_the_cache_can_be_off() {
        let v = vocab();
        let k = keys(true);
        let good =
            token(serde_json::json!({"jti": "j", "exp": 2000, "cube": {"methods": ["GET"]}}));
        // Flip a character in the middle of the signature (the last one may
        // only carry padding bits).
        let at = good.len() - 10;
        let flipped = if &good[at..at + 1] == "A" { "B" } else { "A" };
        let forged = format!("{}{}{}", &good[..at], flipped, &good[at + 1..]);
        assert_eq!(
            k.authenticate(&forged, 1000, &v).err(),
            Some(AuthError::BadSignature)
        );
        assert_eq!(
            k.authenticate(&forged, 1000, &v).err(),
            Some(AuthError::BadSignature)
        );
        assert_eq!(k.cache.as_ref().map(|c| c.len()), Some(0));
        let off = keys(false);
        assert!(off.authenticate(&good, 1000, &v).is_ok());
        assert_eq!(
            off.authenticate(&good, 2010, &v).err(),
            Some(AuthError::Expired)
        );
    }

    #[test]
    fn a_key_prints_its_kid_and_alg_and_never_its_secret() {
        let key = JwtKey::from_secret("k-1", Algorithm::HS256, SECRET).expect("key");
        let shown = format!("{key:?} {key:#?}");
        assert!(shown.contains("k-1") && shown.contains("HS256"), "{shown}");
        let secret = String::from_utf8_lossy(SECRET);
        assert!(!shown.contains(&secret[..8]), "{shown}");
        // Nor as the numbers a derived Debug would print the bytes as.
        assert!(
            !shown.contains(&format!("{}, {}", SECRET[0], SECRET[1])),
            "{shown}"
        );
    }

    #[test]
    fn a_jwk_must_fit_the_pinned_alg_and_its_sizes() {
        use base64::Engine as _;
        let b64 = |n: usize| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(vec![7u8; n]);
        let jwk = |v: serde_json::Value| -> jsonwebtoken::jwk::Jwk {
            serde_json::from_value(v).expect("jwk")
        };
        let refused = |alg, v| {
            JwtKey::from_jwk("k", alg, &jwk(v), 1)
                .err()
                .unwrap_or_else(|| "accepted".into())
        };
        // Each coordinate is checked: one of the wrong length is enough.
        for (x, y) in [(31, 32), (32, 31), (32, 33), (48, 48)] {
            let ec = serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y)});
            assert_eq!(
                refused(Algorithm::ES256, ec),
                "ES256 coordinates must be 32 bytes",
                "x {x}, y {y}"
            );
        }
        // An RSA key of a good size is still not an HMAC secret.
        let rsa = serde_json::json!({"kty": "RSA", "n": b64(256), "e": "AQAB"});
        for alg in [Algorithm::HS256, Algorithm::HS512] {
            assert_eq!(
                refused(alg, rsa.clone()),
                format!("the key does not fit {alg:?}")
            );
        }
        assert!(JwtKey::from_jwk("k", Algorithm::RS256, &jwk(rsa.clone()), 1).is_ok());
        let small = serde_json::json!({"kty": "RSA", "n": b64(255), "e": "AQAB"});
        assert_eq!(
            refused(Algorithm::RS256, small),
            "RSA keys must be at least 2048 bits"
        );
        let ed = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": b64(31)});
        assert_eq!(
            refused(Algorithm::EdDSA, ed),
            "an Ed25519 key must be 32 bytes"
        );
    }

    #[test]
    fn nbf_and_iat_are_honoured_to_the_second_verified_or_cached() {
        let v = vocab();
        for claim in ["nbf", "iat"] {
            let mut c = serde_json::json!({"jti": "j", "exp": 2000, "cube": {"methods": ["GET"]}});
            c[claim] = 1000.into();
            let t = token(c);
            // With a leeway of 10 s the token is good from 990 on: the same
            // second whether verified now or served from the cache.
            for cache in [false, true] {
                let k = keys(cache);
                assert_eq!(
                    k.authenticate(&t, 989, &v).err(),
                    Some(AuthError::NotYetValid),
                    "{claim}, cache {cache}"
                );
                assert!(
                    k.authenticate(&t, 990, &v).is_ok(),
                    "{claim}, cache {cache}"
                );
                assert!(
                    k.authenticate(&t, 990, &v).is_ok(),
                    "{claim}, cache {cache}"
                );
                assert_eq!(
                    k.authenticate(&t, 989, &v).err(),
                    Some(AuthError::NotYetValid),
                    "{claim}, cache {cache}"
                );
            }
        }
    }

    #[test]
    fn aud_must_name_the_audience_as_a_string_or_in_a_list() {
        let v = vocab();
        let mut k = keys(false);
        k.audience = Some("airbrx-api".into());
        for (aud, ok) in [
            (serde_json::json!("airbrx-api"), true),
            (serde_json::json!(["airbrx-api"]), true),
            (serde_json::json!(["other", "airbrx-api"]), true),
            (serde_json::json!("other"), false),
            (serde_json::json!(["other"]), false),
            (serde_json::json!(["other", "airbrx"]), false),
            (serde_json::json!([]), false),
            (serde_json::Value::Null, false),
        ] {
            let t = token(serde_json::json!({
                "jti": "j", "exp": 2000, "aud": aud, "cube": {"methods": ["GET"]}
            }));
            let got = k.authenticate(&t, 1000, &v).err();
            assert_eq!(got, (!ok).then_some(AuthError::WrongAudience), "aud {aud}");
        }
    }
}
