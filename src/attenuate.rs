//! Attenuated tokens (issue "least privilege"): `POST` to the configured
//! path (`attenuation.path`, off unless configured) with a bearer token and
//! a requested cube returns a short-lived JWT for that cube — if, and only
//! if, the cube is inside the caller's own cube and the plan of every tenant
//! and account it reaches. Anything wider is refused with the axis that is
//! too wide. The new token carries a `parent` claim, never outlives its
//! parent, and is verified like any JWT (its key is added to the keys), so
//! it can be attenuated again but never widened.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde::Deserialize;
use serde_json::json;

use crate::config::Snapshot;
use crate::scope::{AccountId, Cube, CubeSpec, MethodSet, Strictness, TagId, TenantId};
use crate::token::{Principal, TokenKind};

/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;

/// `attenuation:` of gateway.yaml, validated.
pub struct Attenuator {
    pub path: String,
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    pub max_ttl: Duration,
}

impl std::fmt::Debug for Attenuator {
    // Never the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attenuator")
            .field("path", &self.path)
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

impl Attenuator {
    pub fn new(
        path: String,
        kid: String,
        alg: Algorithm,
        private_pem: &[u8],
        max_ttl: Duration,
    ) -> Result<Attenuator, String> {
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private_pem),
            other => return Err(format!("alg must be ES256 or EdDSA, not {other:?}")),
        }
        .map_err(|e| format!("not a {alg:?} private key in PEM ({e})"))?;
        Ok(Attenuator {
            path,
            kid,
            alg,
            key,
            max_ttl,
        })
    }

    /// Sign `message` (for the load-time check that the private key matches
    /// the public one).
    pub fn sign(&self, message: &[u8]) -> Result<String, String> {
        jsonwebtoken::crypto::sign(message, &self.key, self.alg).map_err(|e| e.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    #[serde(default)]
    cube: Option<CubeSpec>,
    #[serde(default)]
    cubes: Option<Vec<CubeSpec>>,
    /// Lifetime, e.g. "5m"; at most `max_ttl` (the default).
    #[serde(default)]
    ttl: Option<String>,
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn refuse(rid: &str, status: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    refuse_with(rid, status, reason, message, serde_json::Map::new())
}

/// A refusal with the SPEC §6 body plus `extra` members.
fn refuse_with(
    rid: &str,
    status: StatusCode,
    reason: &str,
    message: String,
    extra: serde_json::Map<String, serde_json::Value>,
) -> Response<Full<Bytes>> {
    let error = match status {
        StatusCode::UNAUTHORIZED => "invalid_token",
        StatusCode::FORBIDDEN => "insufficient_scope",
        _ => "invalid_request",
    };
    let mut body = extra;
    body.insert("error".into(), json!(error));
    body.insert("reason".into(), json!(reason));
    body.insert("message".into(), json!(message));
    body.insert("request_id".into(), json!(rid));
    let mut r = json_response(status, serde_json::Value::Object(body));
    // RFC 6750, as for every denial (SPEC §6).
    let challenge = match status {
        StatusCode::UNAUTHORIZED => Some(r#"Bearer realm="airbrx", error="invalid_token""#),
        StatusCode::FORBIDDEN => Some(r#"Bearer realm="airbrx", error="insufficient_scope""#),
        _ => None,
    };
    if let Some(c) = challenge {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static(c));
    }
    r
}

/// The axis on which a requested cube is wider than everything allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TooWide {
    Method,
    Path,
    Tenant,
    Account,
    Plan,
}

impl TooWide {
    pub fn as_str(self) -> &'static str {
        match self {
            TooWide::Method => "method",
            TooWide::Path => "path",
            TooWide::Tenant => "tenant",
            TooWide::Account => "account",
            TooWide::Plan => "plan",
        }
    }
}

/// `want` inside `have` on one axis after another; the first axis that is
/// not, or `Ok`.
fn within(want: &Cube, have: &Cube, snap: &Snapshot) -> Result<(), TooWide> {
    if !want.methods.is_subset(have.methods) {
        return Err(TooWide::Method);
    }
    let route_covered = |r: u32| {
        have.routes.contains(r)
            || snap
                .routes
                .get(r)
                .and_then(|route| route.tag)
                .is_some_and(|t| have.tags.contains(t))
    };
    let routes_ok = want
        .routes
        .ids()
        .is_some_and(|ids| ids.iter().all(|r| route_covered(*r)));
    if !want.tags.is_subset(&have.tags) || !routes_ok {
        return Err(TooWide::Path);
    }
    if !want.tenants.is_subset(&have.tenants) {
        return Err(TooWide::Tenant);
    }
    if !want.accounts.is_subset(&have.accounts) {
        return Err(TooWide::Account);
    }
    Ok(())
}

/// Every (tenant or account) × tag × method the cube can reach is admitted
/// by the effective plan there.
fn plans_admit(want: &Cube, snap: &Snapshot) -> bool {
    let account_in = |a: AccountId| want.accounts.contains(a);
    let tenants: Vec<TenantId> = match want.tenants.ids() {
        Some(ids) => ids.to_vec(),
        // "*": every tenant of the cube's accounts.
        None => (0..snap.tenants.len() as u32)
            .filter(|t| {
                snap.tenants
                    .get(*t as usize)
                    .is_some_and(|x| account_in(x.account))
            })
            .collect(),
    };
    let accounts: Vec<AccountId> = match want.accounts.ids() {
        Some(ids) => ids.to_vec(),
        None => (0..snap.accounts.len() as u32).collect(),
    };
    let mut tags: Vec<TagId> = match want.tags.ids() {
        Some(ids) => ids.to_vec(),
        None => (0..snap.tags.len() as u32).collect(),
    };
    for r in want.routes.ids().unwrap_or_default() {
        if let Some(t) = snap.routes.get(*r).and_then(|r| r.tag) {
            tags.push(t);
        }
    }
    let methods: Vec<MethodSet> = [
        MethodSet::GET,
        MethodSet::POST,
        MethodSet::PUT,
        MethodSet::PATCH,
        MethodSet::DELETE,
    ]
    .into_iter()
    .filter(|m| m.is_subset(want.methods))
    .collect();
    let plan_ids = tenants
        .iter()
        .filter_map(|t| snap.tenants.get(*t as usize).map(|x| x.plan))
        .chain(
            accounts
                .iter()
                .filter_map(|a| snap.accounts.get(*a as usize).map(|x| x.plan)),
        );
    for p in plan_ids {
        let Some(plan) = snap.plans.get(p as usize) else {
            return false;
        };
        for &tag in &tags {
            for &m in &methods {
                if !plan.admits(tag, m) {
                    return false;
                }
            }
        }
    }
    true
}

/// Check a requested cube against the caller's cubes and the plans.
pub fn check(want: &Cube, have: &[Cube], snap: &Snapshot) -> Result<(), TooWide> {
    let mut furthest: Option<TooWide> = None;
    let mut inside = false;
    for c in have {
        match within(want, c, snap) {
            Ok(()) => {
                inside = true;
                break;
            }
            Err(axis) => furthest = furthest.max(Some(axis)),
        }
    }
    if !inside {
        return Err(furthest.unwrap_or(TooWide::Method));
    }
    if !plans_admit(want, snap) {
        return Err(TooWide::Plan);
    }
    Ok(())
}

/// Handle a request to the attenuation path. `principal` is the caller,
/// already authenticated (or why not).
pub async fn handle(
    att: &Attenuator,
    snap: &Snapshot,
    principal: Result<Principal<'_>, crate::error::Reason>,
    headers: &HeaderMap,
    body: crate::proxy::RequestBody,
    now: i64,
    rid: &str,
) -> Response<Full<Bytes>> {
    let parent = match principal {
        Ok(p) => p,
        Err(reason) => {
            return refuse(
                rid,
                reason.status(),
                reason.as_str(),
                reason.message().to_string(),
            );
        }
    };
    let json_ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_ct {
        return refuse(
            rid,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_request",
            "send the requested cube as application/json".into(),
        );
    }
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return refuse(
                rid,
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                format!("the body is over {MAX_BODY} bytes"),
            );
        }
    };
    let req: RequestBody = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                rid,
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("not a cube request: {e}"),
            );
        }
    };
    let specs = match crate::scope::cube_list(&req.cube, &req.cubes) {
        Ok(s) => s.to_vec(),
        Err(e) => return refuse(rid, StatusCode::BAD_REQUEST, "bad_request", e.into()),
    };
    let vocab = snap.vocabulary();
    let mut wanted = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        // Strict: a typo in a requested name is an error, not a narrower cube.
        let compiled = spec.compile(&vocab, Strictness::Config).and_then(|c| {
            // Unknown tenants and accounts would compile to nothing; a
            // request for one is a mistake worth naming.
            let unknown = spec
                .tenants
                .iter()
                .find(|n| *n != "*" && !vocab.tenants.contains_key(n.as_str()))
                .map(|n| format!("unknown tenant `{n}`"))
                .or_else(|| {
                    spec.accounts
                        .iter()
                        .find(|n| *n != "*" && !vocab.accounts.contains_key(n.as_str()))
                        .map(|n| format!("unknown account `{n}`"))
                });
            match unknown {
                Some(e) => Err(e),
                None => Ok(c),
            }
        });
        match compiled {
            Ok(c) if c.methods == MethodSet::NONE => {
                return refuse(
                    rid,
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("cube {i}: no methods"),
                );
            }
            Ok(c) => wanted.push(c),
            Err(e) => {
                return refuse(
                    rid,
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("cube {i}: {e}"),
                );
            }
        }
    }
    for (i, w) in wanted.iter().enumerate() {
        if let Err(axis) = check(w, parent.cubes(), snap) {
            let mut extra = serde_json::Map::new();
            extra.insert("too_wide".into(), json!(axis.as_str()));
            extra.insert("cube".into(), json!(i));
            return refuse_with(
                rid,
                StatusCode::FORBIDDEN,
                axis.as_str(),
                format!(
                    "cube {i} is wider than {} allows on the {} axis",
                    if axis == TooWide::Plan {
                        "the plan"
                    } else {
                        "the token"
                    },
                    axis.as_str()
                ),
                extra,
            );
        }
    }

    // The lifetime: the request's, at most max_ttl, never past the parent.
    let ttl = match req.ttl.as_deref().map(humantime::parse_duration) {
        None => att.max_ttl,
        Some(Ok(d)) if !d.is_zero() => d.min(att.max_ttl),
        Some(_) => {
            return refuse(
                rid,
                StatusCode::BAD_REQUEST,
                "bad_request",
                "ttl must be a positive duration such as 5m".into(),
            );
        }
    };
    let mut exp = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    let parent_exp = match &parent {
        Principal::Pat(r) => r.expires,
        Principal::Jwt(j) => Some(j.exp.floor() as i64),
        Principal::Introspected(i) => i.exp,
    };
    if let Some(p) = parent_exp {
        exp = exp.min(p);
    }
    if exp <= now {
        return refuse(
            rid,
            StatusCode::FORBIDDEN,
            "expired",
            "the parent token expires now; nothing can be delegated".into(),
        );
    }
    let mut rand = [0u8; 12];
    if getrandom::fill(&mut rand).is_err() {
        return refuse(
            rid,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no randomness for a token id".into(),
        );
    }
    let jti = format!("dlg-{}", hex::encode(rand));
    let mut claims = json!({
        "jti": jti,
        "sub": parent.subject().unwrap_or(parent.token_id()),
        "parent": parent.token_id(),
        "parent_kind": match parent.kind() { TokenKind::Pat => "pat", TokenKind::Jwt => "jwt" },
        "iat": now,
        "exp": exp,
        "cubes": specs,
    });
    if let Some(iss) = &snap.jwt.issuer {
        claims["iss"] = json!(iss);
    }
    if let Some(aud) = &snap.jwt.audience {
        claims["aud"] = json!(aud);
    }
    let mut h = jsonwebtoken::Header::new(att.alg);
    h.kid = Some(att.kid.clone());
    match jsonwebtoken::encode(&h, &claims, &att.key) {
        Ok(token) => json_response(
            StatusCode::CREATED,
            json!({"token": token, "token_id": jti, "parent": parent.token_id(), "expires_at": exp}),
        ),
        Err(e) => refuse(
            rid,
            StatusCode::INTERNAL_SERVER_ERROR,
            "signing_failed",
            format!("could not sign: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_the_attenuator_and_never_its_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let pem = key.serialize_pem();
        let att = Attenuator::new(
            "/_scopegate/v1/tokens".into(),
            "dlg-1".into(),
            Algorithm::ES256,
            pem.as_bytes(),
            Duration::from_secs(600),
        )
        .expect("attenuator");
        let shown = format!("{att:?}");
        for part in ["/_scopegate/v1/tokens", "dlg-1", "ES256"] {
            assert!(shown.contains(part), "{part} missing from {shown}");
        }
        // Not a line of the key's base64, nor its DER in any form.
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!shown.contains(line), "{shown}");
        }
        assert!(!shown.to_ascii_lowercase().contains("key"), "{shown}");
    }
}
