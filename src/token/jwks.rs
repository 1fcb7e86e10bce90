//! JSON Web Key Sets (RFC 7517) as a JWT key source: `tokens.jwt.jwks`,
//! from a file or an `https://` URL.
//!
//! Owns the last good key set (one `ArcSwap`), the background refresh, and
//! the on-demand refetch when a token names a `kid` the set does not have:
//! single-flight (concurrent requests wait for one fetch) and rate-limited
//! (`min_refetch`), so a flood of made-up `kid`s costs one fetch per
//! interval. A failed fetch keeps the last good set; until a first set has
//! loaded, tokens that need it get `key_source_unavailable` (503), never a
//! pass and never a misleading 401.
//!
//! Each key's `alg` is pinned: taken from the JWK's `alg` and checked
//! against its `kty`/`crv`, or, without `alg`, implied by an EC curve or
//! Ed25519. RSA keys without `alg`, symmetric (`oct`) keys, encryption keys
//! (`use: enc`) and keys without `kid` are skipped: a JWKS is public, and a
//! key whose algorithm we would have to guess is one an attacker could pick.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use sha2::Digest;

use super::jwt::JwtKey;
use crate::metrics::Metrics;
use crate::sources::{self, FetchError, SourceClient};

/// Where the key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksLocation {
    File(PathBuf),
    Url(Uri),
}

/// `tokens.jwt.jwks`, validated.
#[derive(Clone)]
pub struct JwksSettings {
    pub location: JwksLocation,
    pub ca: Option<rustls::RootCertStore>,
    pub ca_sha256: Option<String>,
    /// Background refresh interval.
    pub refresh: Duration,
    /// Connect + response timeout of one fetch.
    pub timeout: Duration,
    /// Least time between two fetches caused by unknown `kid`s.
    pub min_refetch: Duration,
}

/// One loaded key set.
#[derive(Debug)]
pub struct KeySet {
    pub keys: HashMap<Box<str>, JwtKey>,
    /// Keys in the document that were not usable (and why, for the log).
    pub skipped: Vec<String>,
    pub loaded_at: SystemTime,
}

/// A JWKS source shared by every generation whose settings are the same.
pub struct Jwks {
    pub settings: JwksSettings,
    identity: String,
    client: Option<SourceClient>,
    current: ArcSwapOption<KeySet>,
    /// Bumped on every successful load; waiting requests compare it.
    version: AtomicU64,
    /// Single flight: one fetch at a time, the others wait for its result.
    flight: tokio::sync::Mutex<()>,
    /// When an unknown `kid` last caused a fetch (the rate limit's clock;
    /// background refreshes do not count against it).
    last_on_demand: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    started: AtomicBool,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `describe`, not the location: a URL's query can carry a
        // credential.
        f.debug_struct("Jwks")
            .field("source", &self.describe())
            .field("keys", &self.current.load().as_ref().map(|s| s.keys.len()))
            .finish()
    }
}

/// The `alg` a JWK is pinned to, or why it cannot be used.
fn pinned_alg(jwk: &Jwk) -> Result<Algorithm, String> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("an encryption key (use: enc)".into());
    }
    let declared = match jwk.common.key_algorithm {
        None => None,
        Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
        Some(KeyAlgorithm::ES384) => Some(Algorithm::ES384),
        Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
        Some(KeyAlgorithm::RS384) => Some(Algorithm::RS384),
        Some(KeyAlgorithm::RS512) => Some(Algorithm::RS512),
        Some(KeyAlgorithm::PS256) => Some(Algorithm::PS256),
        Some(KeyAlgorithm::PS384) => Some(Algorithm::PS384),
        Some(KeyAlgorithm::PS512) => Some(Algorithm::PS512),
        Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
        Some(other) => {
            return Err(format!(
                "alg {other:?} is not a signature algorithm we accept"
            ));
        }
    };
    let implied = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref c => return Err(format!("curve {c:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => Algorithm::EdDSA,
            ref c => return Err(format!("curve {c:?} is not supported")),
        },
        AlgorithmParameters::RSA(_) => match declared {
            Some(
                a @ (Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512),
            ) => a,
            Some(a) => return Err(format!("an RSA key cannot be used with {a:?}")),
            None => return Err("an RSA key without `alg` (RS* or PS* would be a guess)".into()),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (oct) key; HMAC keys are never taken from a JWKS".into());
        }
        _ => return Err("an unsupported key type".into()),
    };
    match declared {
        Some(a) if a != implied => Err(format!(
            "alg {a:?} does not fit the key (it is {implied:?})"
        )),
        _ => Ok(implied),
    }
}

/// Parse a JWKS document. Unusable keys are skipped and listed; a document
/// that is not a JWKS, or has no usable key, is an error (the caller keeps
/// its last good set).
pub fn parse(bytes: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JWK Set (a JSON object with `keys`): {e}"))?;
    let mut keys = HashMap::new();
    let mut skipped = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut duplicated = std::collections::HashSet::new();
    for (i, raw) in doc.keys.iter().enumerate() {
        let kid = raw.get("kid").and_then(|k| k.as_str()).unwrap_or("");
        let label = if kid.is_empty() {
            format!("keys[{i}]")
        } else {
            format!("keys[{i}] ({kid})")
        };
        let jwk: Jwk = match serde_json::from_value(raw.clone()) {
            Ok(j) => j,
            Err(e) => {
                skipped.push(format!("{label}: not a JWK ({e})"));
                continue;
            }
        };
        if kid.is_empty() {
            skipped.push(format!("{label}: no `kid`"));
            continue;
        }
        if !seen.insert(kid) {
            // Two keys under one kid: none of them can be chosen safely.
            duplicated.insert(kid);
            skipped.push(format!(
                "{label}: `kid` appears more than once; all skipped"
            ));
            continue;
        }
        let alg = match pinned_alg(&jwk) {
            Ok(a) => a,
            Err(why) => {
                skipped.push(format!("{label}: {why}"));
                continue;
            }
        };
        // The key's identity for cache checks: the hash of its JSON.
        let serial = {
            let h = sha2::Sha256::digest(raw.to_string().as_bytes());
            u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
        };
        match JwtKey::from_jwk(kid, alg, &jwk, serial) {
            Ok(k) => {
                keys.insert(kid.into(), k);
            }
            Err(why) => skipped.push(format!("{label}: {why}")),
        }
    }
    for kid in duplicated {
        keys.remove(kid);
    }
    if keys.is_empty() {
        return Err(if skipped.is_empty() {
            "the key set is empty".into()
        } else {
            format!("no usable key ({})", skipped.join("; "))
        });
    }
    Ok(KeySet {
        keys,
        skipped,
        loaded_at: SystemTime::now(),
    })
}

impl Jwks {
    /// A source with nothing loaded yet (`initial` for a file read at
    /// configuration load).
    pub fn new(settings: JwksSettings, initial: Option<KeySet>) -> Result<Jwks, String> {
        let client = match &settings.location {
            JwksLocation::Url(_) => Some(sources::client(settings.ca.as_ref(), settings.timeout)?),
            JwksLocation::File(_) => None,
        };
        let identity = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}",
            settings.location,
            settings.ca_sha256,
            settings.refresh,
            settings.timeout,
            settings.min_refetch
        );
        let version = AtomicU64::new(u64::from(initial.is_some()));
        Ok(Jwks {
            settings,
            identity,
            client,
            current: ArcSwapOption::new(initial.map(Arc::new)),
            version,
            flight: tokio::sync::Mutex::new(()),
            last_on_demand: Mutex::new(None),
            last_error: Mutex::new(None),
            started: AtomicBool::new(false),
        })
    }

    /// Equal for two sources with the same settings: a reload keeps the
    /// running one (and its keys) instead of starting over.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Take over a newer source's loaded set (a reload re-read the file).
    pub fn adopt(&self, newer: &Jwks) {
        if let Some(set) = newer.current() {
            self.current.store(Some(set));
            self.version.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The last good key set, if one ever loaded.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.load_full()
    }

    /// Whether `kid` is in the current set with this key identity.
    pub fn still_has(&self, kid: &str, serial: u64) -> bool {
        self.current
            .load()
            .as_ref()
            .and_then(|s| s.keys.get(kid))
            .is_some_and(|k| k.serial == serial)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Number of successful loads so far.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    async fn fetch_bytes(&self) -> Result<Bytes, FetchError> {
        match (&self.settings.location, &self.client) {
            (JwksLocation::File(path), _) => tokio::fs::read(path)
                .await
                .map(Bytes::from)
                .map_err(|e| FetchError::new("read", format!("{}: {e}", path.display()))),
            (JwksLocation::Url(uri), Some(client)) => {
                let req = Request::get(uri.clone())
                    .header(
                        http::header::ACCEPT,
                        "application/jwk-set+json, application/json",
                    )
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| FetchError::new("request", e.to_string()))?;
                sources::fetch(client, req, self.settings.timeout).await
            }
            (JwksLocation::Url(_), None) => Err(FetchError::new("request", "no client")),
        }
    }

    /// Fetch now (the caller holds the flight lock). Returns whether a new
    /// set was published.
    async fn fetch_locked(&self, metrics: &Metrics) -> bool {
        let started = Instant::now();
        let result = self
            .fetch_bytes()
            .await
            .and_then(|b| parse(&b).map_err(|m| FetchError::new("invalid", m)));
        metrics
            .jwks_fetch_duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(set) => {
                metrics.jwks_fetches.with_label_values(&["ok"]).inc();
                metrics.jwks_keys.set(set.keys.len() as i64);
                for s in &set.skipped {
                    tracing::warn!(source = %self.describe(), key = %s, "JWKS key skipped");
                }
                let changed = self
                    .current
                    .load()
                    .as_ref()
                    .is_none_or(|old| !same_keys(old, &set));
                if changed {
                    tracing::info!(source = %self.describe(), keys = set.keys.len(), "JWKS loaded");
                }
                self.current.store(Some(Arc::new(set)));
                self.version.fetch_add(1, Ordering::AcqRel);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                true
            }
            Err(e) => {
                metrics.jwks_fetches.with_label_values(&[e.kind]).inc();
                let keeping = self.current.load().is_some();
                tracing::warn!(source = %self.describe(), error = %e, keeping_last_good = keeping, "JWKS fetch failed");
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.to_string());
                }
                false
            }
        }
    }

    /// A token named a `kid` we do not have (or no set has loaded): fetch
    /// once, unless a fetch is already under way (wait for it) or the last
    /// one was less than `min_refetch` ago. Callers decide again afterwards.
    pub async fn refetch(&self, metrics: &Metrics) {
        let seen = self.version();
        let _flight = self.flight.lock().await;
        if self.version() != seen {
            // Someone else's fetch finished while we waited.
            return;
        }
        if let Ok(mut last) = self.last_on_demand.lock() {
            if last.is_some_and(|t| t.elapsed() < self.settings.min_refetch) {
                metrics
                    .jwks_fetches
                    .with_label_values(&["rate_limited"])
                    .inc();
                return;
            }
            *last = Some(Instant::now());
        }
        self.fetch_locked(metrics).await;
    }

    /// Start the background refresh (once per source; it stops when the
    /// last generation using this source is gone). Fetches at once when no
    /// set is loaded yet.
    pub fn start(self: &Arc<Self>, metrics: Metrics) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.started.store(false, Ordering::Release);
            return;
        };
        if let Some(set) = self.current() {
            metrics.jwks_keys.set(set.keys.len() as i64);
        }
        let weak: Weak<Jwks> = Arc::downgrade(self);
        rt.spawn(async move {
            let mut first = true;
            loop {
                let Some(me) = weak.upgrade() else { break };
                let ok = if first && me.current().is_some() {
                    true
                } else {
                    let seen = me.version();
                    let _flight = me.flight.lock().await;
                    if me.version() != seen {
                        // A fetch on demand (a token with a new `kid`
                        // that came before this task first ran) loaded a
                        // set while this one waited: as fresh as a second
                        // fetch would be, which the key server need not
                        // pay for.
                        true
                    } else {
                        me.fetch_locked(&metrics).await
                    }
                };
                first = false;
                // After a failure, try again sooner than the full interval.
                let wait = if ok {
                    me.settings.refresh
                } else {
                    me.settings
                        .refresh
                        .min(me.settings.min_refetch.max(Duration::from_secs(1)))
                };
                drop(me);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// The source for logs and `/config`: a file path or a URL without its
    /// query (which could carry a credential).
    pub fn describe(&self) -> String {
        match &self.settings.location {
            JwksLocation::File(p) => p.display().to_string(),
            JwksLocation::Url(u) => format!(
                "{}://{}{}",
                u.scheme_str().unwrap_or("https"),
                u.authority().map(|a| a.as_str()).unwrap_or(""),
                u.path()
            ),
        }
    }

    /// What `/config` shows.
    pub fn status(&self) -> serde_json::Value {
        let set = self.current();
        serde_json::json!({
            "source": self.describe(),
            "loaded": set.is_some(),
            "keys": set.as_ref().map(|s| {
                let mut k: Vec<&str> = s.keys.keys().map(|k| &**k).collect();
                k.sort_unstable();
                k
            }),
            "skipped": set.as_ref().map(|s| s.skipped.len()).unwrap_or(0),
            "last_error": self.last_error(),
        })
    }
}

fn same_keys(a: &KeySet, b: &KeySet) -> bool {
    a.keys.len() == b.keys.len()
        && a.keys
            .iter()
            .all(|(kid, k)| b.keys.get(kid).is_some_and(|o| o.serial == k.serial))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn b64(n: usize, byte: u8) -> String {
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            vec![byte; n],
        )
    }

    fn ec(kid: &str, crv: &str, n: usize) -> serde_json::Value {
        json!({"kty": "EC", "crv": crv, "kid": kid, "x": b64(n, 1), "y": b64(n, 2)})
    }

    #[test]
    fn algorithms_are_pinned_or_the_key_is_skipped() {
        let mut enc = ec("enc", "P-256", 32);
        enc["use"] = json!("enc");
        let mut wrong_alg = ec("wrong", "P-256", 32);
        wrong_alg["alg"] = json!("ES384");
        let mut rs_on_ec = ec("rs-on-ec", "P-256", 32);
        rs_on_ec["alg"] = json!("RS256");
        let mut hs = ec("hs", "P-256", 32);
        hs["alg"] = json!("HS256");
        let doc = json!({"keys": [
            ec("p256", "P-256", 32),
            ec("p384", "P-384", 48),
            ec("short", "P-256", 31),
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(32, 3)}),
            json!({"kty": "RSA", "kid": "rsa-no-alg", "n": b64(256, 0xc5), "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "rsa-ps", "alg": "PS256", "n": b64(256, 0xc5), "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "rsa-small", "alg": "RS256", "n": b64(128, 0xc5), "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "rsa-as-ec", "alg": "ES256", "n": b64(256, 0xc5), "e": "AQAB"}),
            json!({"kty": "oct", "kid": "oct", "k": b64(32, 4)}),
            ec("", "P-256", 32),
            enc, wrong_alg, rs_on_ec, hs,
            ec("twice", "P-256", 32),
            ec("twice", "P-256", 32),
            ec("twice", "P-256", 32),
            json!("not a key"),
        ]});
        let set = parse(doc.to_string().as_bytes()).expect("some keys are usable");
        let mut kids: Vec<(&str, Algorithm)> =
            set.keys.values().map(|k| (&*k.kid, k.alg)).collect();
        kids.sort_by_key(|(k, _)| *k);
        assert_eq!(
            kids,
            [
                ("ed", Algorithm::EdDSA),
                ("p256", Algorithm::ES256),
                ("p384", Algorithm::ES384),
                ("rsa-ps", Algorithm::PS256),
            ]
        );
        // Everything else is listed with its reason.
        assert_eq!(set.skipped.len(), 13, "{:#?}", set.skipped);
        let all = set.skipped.join("\n");
        for why in [
            "must be 32 bytes",
            "without `alg`",
            "2048 bits",
            "symmetric",
            "no `kid`",
            "use: enc",
            "does not fit",
            "cannot be used with",
            "not a signature algorithm",
            "appears more than once",
            "not a JWK",
        ] {
            assert!(all.contains(why), "no key skipped for {why:?}:\n{all}");
        }
    }

    /// Settings for a source in a unit test (none of them used to fetch).
    pub(crate) fn settings(location: JwksLocation) -> JwksSettings {
        JwksSettings {
            location,
            ca: None,
            ca_sha256: None,
            refresh: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
            min_refetch: Duration::from_secs(1),
        }
    }

    /// A reload keeps the running source (its keys and refresh task) only
    /// when the identities are equal: every setting must take part, or a
    /// reload that moved the JWKS would keep fetching the old one.
    #[test]
    fn the_identity_changes_with_every_setting() {
        let url = |u: &str| JwksLocation::Url(u.parse().expect("uri"));
        let identity = |s| Jwks::new(s, None).expect("source").identity().to_owned();
        let base = identity(settings(url("https://idp.example/jwks")));
        assert_eq!(
            identity(settings(url("https://idp.example/jwks"))),
            base,
            "the same settings"
        );
        type Change = fn(&mut JwksSettings);
        let changes: [(&str, Change); 6] = [
            ("url", |s| {
                s.location = JwksLocation::Url("https://idp.example/other".parse().expect("uri"))
            }),
            ("file", |s| {
                s.location = JwksLocation::File("jwks.json".into())
            }),
            ("ca_sha256", |s| s.ca_sha256 = Some("ab".repeat(32))),
            ("refresh", |s| s.refresh = Duration::from_secs(61)),
            ("timeout", |s| s.timeout = Duration::from_secs(2)),
            ("min_refetch", |s| s.min_refetch = Duration::from_secs(2)),
        ];
        for (name, change) in changes {
            let mut s = settings(url("https://idp.example/jwks"));
            change(&mut s);
            assert_ne!(identity(s), base, "{name} left the identity unchanged");
        }
    }

    #[test]
    fn debug_names_the_source_and_its_keys_never_the_query() {
        let url = "https://idp.example/jwks?access_token=s3cr3t-value";
        let j = Jwks::new(settings(JwksLocation::Url(url.parse().expect("uri"))), None)
            .expect("source");
        let shown = format!("{j:?}");
        assert!(
            shown.starts_with("Jwks")
                && shown.contains("https://idp.example/jwks")
                && shown.contains("keys: None"),
            "{shown}"
        );
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let doc = json!({"keys": [ec("p256", "P-256", 32)]}).to_string();
        let set = parse(doc.as_bytes()).expect("a key");
        let j =
            Jwks::new(settings(JwksLocation::File("keys.json".into())), Some(set)).expect("source");
        let shown = format!("{j:?}");
        assert!(
            shown.contains("keys.json") && shown.contains("keys: Some(1)"),
            "{shown}"
        );
    }

    /// What decides whether a fetch logs "JWKS loaded" (a refresh that
    /// found the same keys stays quiet): the same kids with the same
    /// material, whatever the order or the load time.
    #[test]
    fn same_keys_compares_kids_and_material() {
        let set = |keys: Vec<serde_json::Value>| {
            parse(json!({ "keys": keys }).to_string().as_bytes()).expect("set")
        };
        let a = set(vec![ec("a", "P-256", 32), ec("b", "P-384", 48)]);
        assert!(same_keys(&a, &a));
        assert!(same_keys(
            &a,
            &set(vec![ec("b", "P-384", 48), ec("a", "P-256", 32)])
        ));
        let mut other_material = ec("b", "P-384", 48);
        other_material["x"] = json!(b64(48, 9));
        for (why, b) in [
            (
                "a key more",
                set(vec![
                    ec("a", "P-256", 32),
                    ec("b", "P-384", 48),
                    ec("c", "P-256", 32),
                ]),
            ),
            ("a key less", set(vec![ec("a", "P-256", 32)])),
            (
                "another kid",
                set(vec![ec("a", "P-256", 32), ec("c", "P-384", 48)]),
            ),
            (
                "other material",
                set(vec![ec("a", "P-256", 32), other_material]),
            ),
        ] {
            assert!(!same_keys(&a, &b), "{why}");
            assert!(!same_keys(&b, &a), "{why}, the other way");
        }
    }

    #[test]
    fn documents_without_a_usable_key_are_errors() {
        for doc in [
            "",
            "[]",
            "{}",
            r#"{"keys": []}"#,
            r#"{"keys": [{"kty": "oct", "kid": "a", "k": "AAAA"}]}"#,
        ] {
            assert!(parse(doc.as_bytes()).is_err(), "{doc}");
        }
    }
}
