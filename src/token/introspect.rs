//! RFC 7662 token introspection for PATs that are not in the PAT file
//! (`tokens.introspection`).
//!
//! Owns the call to the endpoint (form POST, client credentials in HTTP
//! Basic, never logged) and a cache by the token's SHA-256: active answers
//! for `positive_ttl` capped by the token's `exp`, inactive ones for
//! `negative_ttl`, failures never. The cache holds identity and the cube
//! *as names*; the names are compiled against the serving configuration on
//! every request, so a cached answer never carries authorization from an
//! older configuration (the Oathkeeper cache-leak class of bug). An
//! endpoint that fails with nothing cached is `token_source_unavailable`
//! (503), never a pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Request, Uri};
use http_body_util::Full;

use super::{AuthError, Principal, is_safe_identity, pat};
use crate::metrics::Metrics;
use crate::scope::{Cube, CubeSpec, Strictness, Vocabulary, cube_list};
use crate::sources::{self, FetchError, SourceClient};

/// `tokens.introspection`, validated, credentials resolved.
pub struct IntrospectionSettings {
    pub url: Uri,
    pub client_id: String,
    pub client_secret: String,
    pub ca: Option<rustls::RootCertStore>,
    pub ca_sha256: Option<String>,
    pub timeout: Duration,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    pub cache_size: usize,
}

/// What an active answer said, kept in the cache.
#[derive(Debug)]
pub struct Active {
    pub token_id: Box<str>,
    pub subject: Option<Box<str>>,
    pub cubes: Vec<CubeSpec>,
    /// The token's own `exp` (Unix seconds), if the endpoint sent one.
    pub exp: Option<i64>,
}

#[derive(Clone)]
enum Entry {
    Active { answer: Arc<Active>, until: Instant },
    Inactive { until: Instant },
}

/// A PAT the endpoint vouched for, with its cubes compiled against the
/// configuration serving this request.
#[derive(Debug)]
pub struct Introspected {
    pub token_id: Box<str>,
    pub subject: Option<Box<str>>,
    pub cubes: Box<[Cube]>,
    /// The token's `exp` as the endpoint said (Unix seconds).
    pub exp: Option<i64>,
}

pub struct Introspector {
    url: Uri,
    /// `Basic base64(id:secret)`, marked sensitive.
    authorization: HeaderValue,
    client: SourceClient,
    timeout: Duration,
    positive_ttl: Duration,
    negative_ttl: Duration,
    cache: quick_cache::sync::Cache<[u8; 32], Entry>,
    /// Calls under way, by token hash: concurrent misses for one token share
    /// one call and its answer (also a failure).
    inflight: std::sync::Mutex<std::collections::HashMap<[u8; 32], Arc<Flight>>>,
    identity: String,
}

/// One call's shared answer: `Some` active, `None` inactive.
type Flight = tokio::sync::OnceCell<Result<Option<Arc<Active>>, FetchError>>;

impl std::fmt::Debug for Introspector {
    // Never the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspector")
            .field("url", &self.describe())
            .field("cached", &self.cache.len())
            .finish()
    }
}

/// `application/x-www-form-urlencoded` for one value (RFC 6749 §2.3.1
/// applies it to client credentials too).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*') {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Introspector {
    pub fn new(s: IntrospectionSettings) -> Result<Introspector, String> {
        let client = sources::client(s.ca.as_ref(), s.timeout)?;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            form_encode(&s.client_id),
            form_encode(&s.client_secret)
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| "client credentials are not header-safe".to_string())?;
        authorization.set_sensitive(true);
        // The identity covers the credentials by hash only.
        let cred_hash = hex::encode(pat::hash(&format!("{}\n{}", s.client_id, s.client_secret)));
        let identity = format!(
            "{}|{:?}|{cred_hash}|{:?}|{:?}|{:?}|{}",
            s.url, s.ca_sha256, s.timeout, s.positive_ttl, s.negative_ttl, s.cache_size
        );
        Ok(Introspector {
            url: s.url,
            authorization,
            client,
            timeout: s.timeout,
            positive_ttl: s.positive_ttl,
            negative_ttl: s.negative_ttl,
            cache: quick_cache::sync::Cache::new(s.cache_size),
            inflight: std::sync::Mutex::default(),
            identity,
        })
    }

    /// Equal for two introspectors with the same settings: a reload keeps
    /// the running one and its cache.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The endpoint without its query, for logs and `/config`.
    pub fn describe(&self) -> String {
        format!(
            "https://{}{}",
            self.url.authority().map(|a| a.as_str()).unwrap_or(""),
            self.url.path()
        )
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Who `token` (a well-formed PAT) is, from the cache or the endpoint.
    /// `now` is Unix seconds.
    pub async fn lookup(
        &self,
        token: &str,
        now: i64,
        metrics: &Metrics,
    ) -> Result<Arc<Active>, AuthError> {
        let key = pat::hash(token);
        let t = Instant::now();
        match self.cache.get(&key) {
            Some(Entry::Active { answer, until }) if t < until => {
                metrics
                    .introspection_cache
                    .with_label_values(&["hit"])
                    .inc();
                return check_exp(answer, now);
            }
            Some(Entry::Inactive { until }) if t < until => {
                metrics
                    .introspection_cache
                    .with_label_values(&["hit"])
                    .inc();
                return Err(AuthError::UnknownToken);
            }
            Some(_) => {
                self.cache.remove(&key);
            }
            None => {}
        }
        metrics
            .introspection_cache
            .with_label_values(&["miss"])
            .inc();
        let flight = match self.inflight.lock() {
            Ok(mut m) => m.entry(key).or_default().clone(),
            // A poisoned map only loses the sharing, not correctness.
            Err(_) => Arc::default(),
        };
        let answer = flight
            .get_or_init(|| self.call_and_cache(key, token, now, metrics))
            .await
            .clone();
        if let Ok(mut m) = self.inflight.lock()
            && m.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight))
        {
            m.remove(&key);
        }
        match answer {
            Ok(Some(active)) => check_exp(active, now),
            Ok(None) => Err(AuthError::UnknownToken),
            Err(_) => Err(AuthError::TokenSourceUnavailable),
        }
    }

    /// One call, counted and timed, its answer cached (failures are not).
    async fn call_and_cache(
        &self,
        key: [u8; 32],
        token: &str,
        now: i64,
        metrics: &Metrics,
    ) -> Result<Option<Arc<Active>>, FetchError> {
        let t = Instant::now();
        let result = self.call(token).await;
        metrics
            .introspection_duration
            .observe(t.elapsed().as_secs_f64());
        match result {
            Ok(Some(answer)) => {
                metrics
                    .introspection_requests
                    .with_label_values(&["active"])
                    .inc();
                let mut ttl = self.positive_ttl;
                if let Some(exp) = answer.exp {
                    let left = u64::try_from(exp.saturating_sub(now)).unwrap_or(0);
                    ttl = ttl.min(Duration::from_secs(left));
                }
                let answer = Arc::new(answer);
                if !ttl.is_zero() {
                    self.cache.insert(
                        key,
                        Entry::Active {
                            answer: answer.clone(),
                            until: t + ttl,
                        },
                    );
                }
                Ok(Some(answer))
            }
            Ok(None) => {
                metrics
                    .introspection_requests
                    .with_label_values(&["inactive"])
                    .inc();
                self.cache.insert(
                    key,
                    Entry::Inactive {
                        until: t + self.negative_ttl,
                    },
                );
                Ok(None)
            }
            Err(e) => {
                metrics
                    .introspection_requests
                    .with_label_values(&[e.kind])
                    .inc();
                tracing::warn!(endpoint = %self.describe(), error = %e, "introspection failed");
                Err(e)
            }
        }
    }

    /// One RFC 7662 call: `Some` for an active token, `None` for inactive.
    async fn call(&self, token: &str) -> Result<Option<Active>, FetchError> {
        let body = format!("token={}&token_type_hint=access_token", form_encode(token));
        let req = Request::post(self.url.clone())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::AUTHORIZATION, self.authorization.clone())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| FetchError::new("request", e.to_string()))?;
        let bytes = sources::fetch(&self.client, req, self.timeout).await?;
        parse_answer(&bytes).map_err(|m| FetchError::new("invalid", m))
    }
}

fn check_exp(answer: Arc<Active>, now: i64) -> Result<Arc<Active>, AuthError> {
    match answer.exp {
        Some(exp) if now >= exp => Err(AuthError::Expired),
        _ => Ok(answer),
    }
}

/// Read an RFC 7662 response. `active` is required; an active answer must
/// name the token (`token_id`, `jti` or `sub`, header-safe) and carry a
/// `cube` or `cubes`, or it is unusable (an error, not a pass).
pub fn parse_answer(bytes: &[u8]) -> Result<Option<Active>, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        active: bool,
        #[serde(default)]
        exp: Option<f64>,
        #[serde(default)]
        sub: Option<String>,
        #[serde(default)]
        jti: Option<String>,
        #[serde(default)]
        token_id: Option<String>,
        #[serde(default)]
        cube: Option<CubeSpec>,
        #[serde(default)]
        cubes: Option<Vec<CubeSpec>>,
    }
    // UTF-8 first: serde does not check the strings of members it skips.
    let text = std::str::from_utf8(bytes).map_err(|_| "the answer is not UTF-8".to_string())?;
    let a: Answer =
        serde_json::from_str(text).map_err(|e| format!("not an RFC 7662 answer: {e}"))?;
    if !a.active {
        return Ok(None);
    }
    let token_id = a
        .token_id
        .or(a.jti)
        .or_else(|| a.sub.clone())
        .ok_or("an active answer names no token (token_id, jti or sub)")?;
    if !is_safe_identity(&token_id) {
        return Err("the token id is not 1-256 visible ASCII characters".into());
    }
    if let Some(sub) = &a.sub
        && !is_safe_identity(sub)
    {
        return Err("`sub` is not 1-256 visible ASCII characters".into());
    }
    let cubes = cube_list(&a.cube, &a.cubes)?.to_vec();
    let exp = match a.exp {
        Some(e) if e.is_finite() => Some(e.floor() as i64),
        Some(_) => return Err("`exp` is not a number".into()),
        None => None,
    };
    Ok(Some(Active {
        token_id: token_id.into(),
        subject: a.sub.map(String::into_boxed_str),
        cubes,
        exp,
    }))
}

/// Compile a cached answer against the configuration of this request.
pub fn principal(answer: &Active, vocab: &Vocabulary<'_>) -> Result<Principal<'static>, AuthError> {
    let cubes = answer
        .cubes
        .iter()
        .map(|c| c.compile(vocab, Strictness::Claims))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| AuthError::Malformed)?;
    Ok(Principal::Introspected(Arc::new(Introspected {
        token_id: answer.token_id.clone(),
        subject: answer.subject.clone(),
        cubes: cubes.into_boxed_slice(),
        exp: answer.exp,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        let cube = r#""cube": {"methods": ["GET"]}"#;
        assert!(matches!(parse_answer(br#"{"active": false}"#), Ok(None)));
        // Inactive wins whatever else is there.
        assert!(matches!(
            parse_answer(br#"{"active": false, "token_id": "t", "cube": {}}"#),
            Ok(None)
        ));
        let ok = parse_answer(
            format!(r#"{{"active": true, "jti": "j", "sub": "s", "exp": 99.9, {cube}}}"#)
                .as_bytes(),
        )
        .expect("parses")
        .expect("active");
        assert_eq!((&*ok.token_id, ok.exp), ("j", Some(99)));
        // A far-future time saturates rather than wrapping into the past.
        let far = parse_answer(
            format!(r#"{{"active": true, "token_id": "t", "exp": 1e300, {cube}}}"#).as_bytes(),
        )
        .expect("parses")
        .expect("active");
        assert_eq!(far.exp, Some(i64::MAX));
        let bad = [
            "{}".to_string(),
            r#"{"active": "true"}"#.to_string(),
            format!(r#"{{"active": true, {cube}}}"#),
            r#"{"active": true, "token_id": "t"}"#.to_string(),
            format!(r#"{{"active": true, "token_id": "a b", {cube}}}"#),
            format!(r#"{{"active": true, "token_id": "t", "sub": "x\ny", {cube}}}"#),
            r#"{"active": true, "token_id": "t", "cube": {}, "cubes": [{}]}"#.to_string(),
            "not json".to_string(),
            // serde_json refuses a number beyond f64 (no infinity reaches
            // the `is_finite` guard, which stays as a second line), and a
            // string is not a time.
            format!(r#"{{"active": true, "token_id": "t", "exp": 1e400, {cube}}}"#),
            format!(r#"{{"active": true, "token_id": "t", "exp": "soon", {cube}}}"#),
        ];
        for b in bad {
            assert!(parse_answer(b.as_bytes()).is_err(), "{b}");
        }
        // Not UTF-8 inside a member we do not read: still refused.
        let mut raw =
            br#"{"active": true, "token_id": "t", "cube": {"methods": ["GET"]}, "x": "?"}"#
                .to_vec();
        let at = raw.len() - 3;
        raw[at] = 0x89;
        assert!(parse_answer(&raw).is_err());
    }

    fn settings() -> IntrospectionSettings {
        IntrospectionSettings {
            url: "https://idp.example/introspect?x=1".parse().expect("uri"),
            client_id: "id".into(),
            client_secret: "s3cr3t-value".into(),
            ca: None,
            ca_sha256: None,
            timeout: Duration::from_secs(1),
            positive_ttl: Duration::from_secs(1),
            negative_ttl: Duration::from_secs(1),
            cache_size: 1,
        }
    }

    #[test]
    fn credentials_are_form_encoded_and_never_printed() {
        assert_eq!(form_encode("a b:c/é"), "a+b%3Ac%2F%C3%A9");
        let i = Introspector::new(settings()).expect("introspector");
        let shown = format!("{i:?}");
        assert!(
            shown.starts_with("Introspector")
                && shown.contains("https://idp.example/introspect")
                && shown.contains("cached: 0"),
            "{shown}"
        );
        let shown = format!("{shown} {}", i.identity());
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert_eq!(i.describe(), "https://idp.example/introspect");
        assert!(i.authorization.is_sensitive());
    }

    /// A reload keeps the running introspector (and its cache) only when
    /// the identities are equal: every setting must take part, or a reload
    /// that changed the endpoint or the credentials would keep the old.
    #[test]
    fn the_identity_changes_with_every_setting() {
        let identity = |s| {
            Introspector::new(s)
                .expect("introspector")
                .identity()
                .to_owned()
        };
        let base = identity(settings());
        assert_eq!(identity(settings()), base, "the same settings");
        type Change = fn(&mut IntrospectionSettings);
        let changes: [(&str, Change); 8] = [
            ("url", |s| {
                s.url = "https://idp.example/other".parse().expect("uri")
            }),
            ("client_id", |s| s.client_id = "id2".into()),
            ("client_secret", |s| s.client_secret = "other".into()),
            ("ca_sha256", |s| s.ca_sha256 = Some("ab".repeat(32))),
            ("timeout", |s| s.timeout = Duration::from_secs(2)),
            ("positive_ttl", |s| s.positive_ttl = Duration::from_secs(2)),
            ("negative_ttl", |s| s.negative_ttl = Duration::from_secs(2)),
            ("cache_size", |s| s.cache_size = 2),
        ];
        for (name, change) in changes {
            let mut s = settings();
            change(&mut s);
            assert_ne!(identity(s), base, "{name} left the identity unchanged");
        }
    }
}
