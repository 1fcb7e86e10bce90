//! gateway.yaml → one validated, compiled [`Snapshot`] (SPEC §3, §5).
//!
//! Owns the file formats (serde structs that deny unknown keys), every
//! validation rule, and compiling names into the dense ids the hot path uses.
//! It reads files (gateway.yaml, the PAT file, key files) but starts nothing:
//! a snapshot is plain data plus an idle upstream client, so building one is
//! safe to do off the request path and to throw away when it fails.
//!
//! Errors name the file, the line where the YAML parser gives one, and the
//! key; all validation errors of a file are reported together.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::routes::RouteTable;
use crate::scope::{AccountId, MethodSet, Plan, PlanId, TagId, TenantId, Vocabulary};
use crate::token::jwt::{JwtKey, JwtKeys, is_hmac, parse_alg};
use crate::token::pat::{PatFileSpec, PatRecordSpec, PatStore};

// ---------------------------------------------------------------------------
// Errors

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {message}", file.display())]
    Io { file: PathBuf, message: String },
    #[error("{}{}: {message}", file.display(), fmt_loc(*line, *column))]
    Parse {
        file: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    #[error("{}: {key}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

fn fmt_loc(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// Every problem found while loading, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

fn parse_error(file: &Path, e: serde_yaml::Error) -> ConfigError {
    let loc = e.location();
    ConfigError::Parse {
        file: file.to_path_buf(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        message: e.to_string(),
    }
}

struct Problems<'f> {
    file: &'f Path,
    list: Vec<ConfigError>,
}

impl Problems<'_> {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        });
    }
}

// ---------------------------------------------------------------------------
// File format

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration with a unit such as 250ms, 2s or 5m ({e})"
        ))
    })
}

/// A mapping whose keys must be unique. serde_yaml would otherwise keep the
/// last of two equal keys, silently changing a tenant, account or plan.
fn unique_map<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Visitor<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a mapping")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
                }
                let value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visitor(std::marker::PhantomData))
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// gateway.yaml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    pub listen: ListenSpec,
    #[serde(default)]
    pub admin: Option<AdminSpec>,
    pub upstream: UpstreamSpec,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub tokens: TokensSpec,
    #[serde(default, deserialize_with = "unique_map")]
    pub plans: BTreeMap<String, Vec<PlanEntrySpec>>,
    #[serde(default, deserialize_with = "unique_map")]
    pub accounts: BTreeMap<String, AccountSpec>,
    #[serde(default, deserialize_with = "unique_map")]
    pub tenants: BTreeMap<String, TenantSpec>,
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub limits: LimitsSpec,
    #[serde(default)]
    pub metrics: MetricsSpec,
    #[serde(default)]
    pub usage: UsageSpec,
    /// Attenuated tokens: off unless configured.
    #[serde(default)]
    pub attenuation: Option<AttenuationSpec>,
    /// Named (methods × path axis) grants for cubes and JWT scope strings.
    #[serde(default, deserialize_with = "unique_map")]
    pub roles: BTreeMap<String, crate::scope::RoleSpec>,
}

/// `attenuation:`: the endpoint that mints narrower, short-lived tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttenuationSpec {
    #[serde(default = "default_attenuation_path")]
    pub path: String,
    pub kid: String,
    /// ES256 or EdDSA.
    pub alg: String,
    pub private_key: String,
    pub public_key: String,
    #[serde(default = "default_attenuation_ttl", deserialize_with = "duration")]
    pub max_ttl: Duration,
}

fn default_attenuation_path() -> String {
    "/_scopegate/v1/tokens".into()
}
fn default_attenuation_ttl() -> Duration {
    Duration::from_secs(900)
}

/// The usage book behind `GET /tokens/{id}/usage` and `scopegate suggest`.
/// Sizes are read at start; a reload does not resize the book.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Token ids kept (least recently used dropped first).
    #[serde(default = "default_usage_tokens")]
    pub max_tokens: usize,
    /// Distinct (method, route, tenant, account) shapes kept per token.
    #[serde(default = "default_usage_calls")]
    pub max_calls: usize,
}

impl Default for UsageSpec {
    fn default() -> Self {
        UsageSpec {
            enabled: true,
            max_tokens: default_usage_tokens(),
            max_calls: default_usage_calls(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_usage_tokens() -> usize {
    10_000
}
fn default_usage_calls() -> usize {
    256
}

/// Metric options. Tenant ids are unbounded, so they are a label only when
/// an operator asks for it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// Also count requests in `scopegate_tenant_requests_total{tenant, decision}`.
    #[serde(default)]
    pub tenant_label: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSpec {
    pub addr: String,
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    pub addr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub url: String,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub forward_authorization: bool,
    /// Speak HTTP/2 to a plaintext upstream (h2c prior knowledge). For
    /// `https://` upstreams HTTP/2 is negotiated by ALPN regardless.
    #[serde(default)]
    pub http2: bool,
    /// PEM bundle of the CAs an `https://` upstream's certificate must chain
    /// to, instead of the public web PKI roots.
    #[serde(default)]
    pub ca: Option<String>,
}

/// `enforce` denies; `shadow` logs and counts denials and forwards anyway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensSpec {
    #[serde(default)]
    pub pat_file: Option<String>,
    #[serde(default)]
    pub jwt: Option<JwtSpec>,
    /// RFC 7662 introspection for PATs not in the PAT file.
    #[serde(default)]
    pub introspection: Option<IntrospectionSpec>,
}

/// `tokens.jwt.jwks`: exactly one of `file` and `url`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksSpec {
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    /// Extra trust for the URL's certificate (replaces the web PKI roots).
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default = "default_jwks_refresh", deserialize_with = "duration")]
    pub refresh: Duration,
    #[serde(default = "default_source_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_min_refetch", deserialize_with = "duration")]
    pub min_refetch: Duration,
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_source_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_min_refetch() -> Duration {
    Duration::from_secs(10)
}

/// `tokens.introspection`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionSpec {
    pub url: String,
    pub client_id_env: String,
    pub client_secret_env: String,
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default = "default_source_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_positive_ttl", deserialize_with = "duration")]
    pub positive_ttl: Duration,
    #[serde(default = "default_negative_ttl", deserialize_with = "duration")]
    pub negative_ttl: Duration,
    #[serde(default = "default_introspection_cache")]
    pub cache_size: usize,
}

fn default_positive_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_introspection_cache() -> usize {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSpec {
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// Verified tokens kept per generation (0 disables the cache).
    #[serde(default = "default_jwt_cache_size")]
    pub cache_size: usize,
    /// A JWK Set beside (or instead of) `keys`.
    #[serde(default)]
    pub jwks: Option<JwksSpec>,
}

fn default_jwt_cache_size() -> usize {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub kid: String,
    pub alg: String,
    #[serde(default)]
    pub public_key: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanEntrySpec {
    pub tags: Vec<String>,
    pub methods: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSpec {
    pub plan: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub account: String,
    #[serde(default)]
    pub plan: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub path: String,
    #[serde(default)]
    pub tag: Option<String>,
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub public: bool,
}

/// Connection limits (SPEC §10). Every one has a default an operator can change.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Largest request head (request line + headers) accepted, in bytes.
    #[serde(default = "LimitsSpec::default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Time a client has to send a complete request head (slowloris guard).
    #[serde(
        default = "LimitsSpec::default_header_read_timeout",
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub header_read_timeout: Duration,
    /// Idle time after which a keep-alive connection is closed.
    #[serde(
        default = "LimitsSpec::default_idle_timeout",
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the accept queue.
    #[serde(default = "LimitsSpec::default_max_connections")]
    pub max_connections: usize,
    /// How long SIGTERM/SIGINT waits for requests in flight.
    #[serde(
        default = "LimitsSpec::default_drain_timeout",
        deserialize_with = "duration",
        serialize_with = "ser_duration"
    )]
    pub drain_timeout: Duration,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl LimitsSpec {
    fn default_max_header_bytes() -> usize {
        16 * 1024
    }
    fn default_header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    fn default_max_connections() -> usize {
        10_000
    }
    fn default_drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            max_header_bytes: Self::default_max_header_bytes(),
            header_read_timeout: Self::default_header_read_timeout(),
            idle_timeout: Self::default_idle_timeout(),
            max_connections: Self::default_max_connections(),
            drain_timeout: Self::default_drain_timeout(),
        }
    }
}

// ---------------------------------------------------------------------------
// Compiled form

/// Where the gateway forwards to.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub forward_authorization: bool,
    pub http2: bool,
    /// Trusted roots for an `https://` upstream; `None` is the web PKI.
    pub ca: Option<std::sync::Arc<rustls::RootCertStore>>,
    /// SHA-256 of the CA bundle, to tell whether a reload changed it.
    pub ca_sha256: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Account {
    pub name: Box<str>,
    pub plan: PlanId,
    pub header: HeaderValue,
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: Box<str>,
    pub account: AccountId,
    /// Effective plan: the tenant's own, else its account's.
    pub plan: PlanId,
    pub header: HeaderValue,
}

/// A file the snapshot was built from, with its content hash (for `/config`
/// and for telling whether a reload changed anything).
#[derive(Debug, Clone, Serialize)]
pub struct LoadedFile {
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS termination settings, built when the snapshot is.
#[derive(Debug, Clone)]
pub struct Tls {
    pub files: TlsFiles,
    pub config: std::sync::Arc<rustls::ServerConfig>,
}

/// One immutable, fully validated configuration generation. Everything a
/// request needs is reachable from here; a request loads it once.
#[derive(Debug)]
pub struct Snapshot {
    pub source: PathBuf,
    pub loaded_at: SystemTime,
    pub listen_addr: SocketAddr,
    pub tls: Option<Tls>,
    pub admin_addr: Option<SocketAddr>,
    pub upstream: Upstream,
    pub mode: Mode,
    pub limits: LimitsSpec,
    pub metrics: MetricsSpec,
    pub usage: UsageSpec,
    pub routes: RouteTable,
    pub tags: Vec<Box<str>>,
    pub tag_ids: HashMap<Box<str>, TagId>,
    pub tag_headers: Vec<HeaderValue>,
    pub plans: Vec<Plan>,
    pub plan_ids: HashMap<Box<str>, PlanId>,
    pub plan_headers: Vec<HeaderValue>,
    pub accounts: Vec<Account>,
    pub account_ids: NameIds<AccountId>,
    pub tenants: Vec<Tenant>,
    pub tenant_ids: NameIds<TenantId>,
    pub roles: HashMap<Box<str>, crate::scope::RoleSpec>,
    pub pats: PatStore,
    pub jwt: JwtKeys,
    /// `attenuation:`, when configured.
    pub attenuation: Option<std::sync::Arc<crate::attenuate::Attenuator>>,
    /// `tokens.introspection`, shared across generations with equal settings.
    pub introspection: Option<std::sync::Arc<crate::token::introspect::Introspector>>,
    pub files: Vec<LoadedFile>,
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// The names cubes are compiled against.
    pub fn vocabulary(&self) -> Vocabulary<'_> {
        Vocabulary {
            tags: &self.tag_ids,
            routes: self.routes.templates(),
            tenants: &self.tenant_ids,
            accounts: &self.account_ids,
            roles: &self.roles,
        }
    }
}

/// Tenant and account ids by name: looked up on every request with the
/// name a path carries. foldhash instead of SipHash (about 150 instructions
/// a lookup less); the tables are built from the configuration only, so a
/// client choosing names can probe them but never grow a collision chain.
pub type NameIds<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// Environment lookups go through this, so tests and `demo` never mutate
/// the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Tenant and account ids appear in paths and headers: keep them to the
/// unreserved URI characters so the canonical path and the config agree.
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether every file a snapshot was built from still holds the bytes it
/// held then (same SHA-256). A file that cannot be read counts as changed,
/// so the full load that follows reports it.
pub fn files_unchanged(files: &[LoadedFile]) -> bool {
    files
        .iter()
        .all(|f| file_sha256_hex(&f.path).is_ok_and(|h| h == f.sha256))
}

/// A file's SHA-256, streamed (a large PAT file is never held whole).
fn file_sha256_hex(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn read_file(path: &Path, files: &mut Vec<LoadedFile>) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::Io {
        file: path.to_path_buf(),
        message: e.to_string(),
    })?;
    files.push(LoadedFile {
        path: path.to_path_buf(),
        sha256: sha256_hex(&bytes),
    });
    Ok(bytes)
}

fn header_value(s: &str) -> HeaderValue {
    // Callers pass names already checked by `valid_id` or route tags, which
    // are restricted the same way; fall back to an empty value, never panic.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Read and compile the configuration at `path`.
pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Snapshot, ConfigErrors> {
    let mut files = Vec::new();
    let bytes = read_file(path, &mut files)?;
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
        file: path.to_path_buf(),
        line: None,
        column: None,
        message: "not UTF-8".into(),
    })?;
    compile(&text, path, files, env)
}

/// Compile configuration text as if read from `file` (relative paths resolve
/// against its directory). For tests with inline YAML.
pub fn from_yaml(text: &str, file: &Path, env: EnvLookup<'_>) -> Result<Snapshot, ConfigErrors> {
    let files = vec![LoadedFile {
        path: file.to_path_buf(),
        sha256: sha256_hex(text.as_bytes()),
    }];
    compile(text, file, files, env)
}

fn compile(
    text: &str,
    file: &Path,
    mut files: Vec<LoadedFile>,
    env: EnvLookup<'_>,
) -> Result<Snapshot, ConfigErrors> {
    let spec: GatewaySpec = serde_yaml::from_str(text).map_err(|e| parse_error(file, e))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let resolve = |p: &str| -> PathBuf { base.join(p) };
    let mut problems = Problems {
        file,
        list: Vec::new(),
    };

    // listen / admin / upstream
    let listen_addr = spec.listen.addr.parse::<SocketAddr>().unwrap_or_else(|e| {
        problems.add(
            "listen.addr",
            format!("`{}` is not host:port ({e})", spec.listen.addr),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    let tls = match &spec.listen.tls {
        None => None,
        Some(t) => {
            let files_ = TlsFiles {
                cert: resolve(&t.cert),
                key: resolve(&t.key),
            };
            let cert = read_file(&files_.cert, &mut files);
            let key = read_file(&files_.key, &mut files);
            match (cert, key) {
                (Ok(c), Ok(k)) => match crate::tls::server_config(&files_, &c, &k) {
                    Ok(config) => Some(Tls {
                        files: files_,
                        config,
                    }),
                    Err(e) => {
                        problems.add("listen.tls", e);
                        None
                    }
                },
                (c, k) => {
                    for e in [c.err(), k.err()].into_iter().flatten() {
                        problems.list.push(e);
                    }
                    None
                }
            }
        }
    };
    let admin_addr = spec
        .admin
        .as_ref()
        .and_then(|a| match a.addr.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                problems.add("admin.addr", format!("`{}` is not host:port ({e})", a.addr));
                None
            }
        });
    let mut upstream = compile_upstream(&spec.upstream, &mut problems);
    let (ca, ca_sha256) = optional_ca(
        spec.upstream.ca.as_deref(),
        "upstream.ca",
        &resolve,
        &mut files,
        &mut problems,
    );
    upstream.ca = ca.map(std::sync::Arc::new);
    upstream.ca_sha256 = ca_sha256;
    if spec.limits.max_header_bytes < 8192 {
        problems.add(
            "limits.max_header_bytes",
            "must be at least 8192 (hyper's smallest read buffer)",
        );
    }
    if spec.limits.max_connections == 0 {
        problems.add("limits.max_connections", "must be at least 1");
    }

    // routes → tags
    let mut routes = RouteTable::default();
    let mut tags: Vec<Box<str>> = Vec::new();
    let mut tag_ids: HashMap<Box<str>, TagId> = HashMap::new();
    for (i, r) in spec.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        let methods = match &r.methods {
            None => MethodSet::ALL,
            Some(list) => match MethodSet::parse(list) {
                Ok(m) if !m.is_empty() => m,
                Ok(_) => {
                    problems.add(
                        format!("{key}.methods"),
                        "is empty; omit it to accept every method",
                    );
                    continue;
                }
                Err(e) => {
                    problems.add(format!("{key}.methods"), e);
                    continue;
                }
            },
        };
        let tag = match (&r.tag, r.public) {
            (Some(_), true) => {
                problems.add(
                    format!("{key}.tag"),
                    "a public route has no tag (it skips authorization)",
                );
                continue;
            }
            (None, false) => {
                problems.add(
                    format!("{key}.tag"),
                    "missing: every non-public route needs a tag",
                );
                continue;
            }
            (None, true) => None,
            (Some(t), false) => {
                if !valid_id(t) {
                    problems.add(
                        format!("{key}.tag"),
                        format!("`{t}` must be letters, digits, '-', '_', '.' or '~'"),
                    );
                    continue;
                }
                let next = tags.len() as TagId;
                let id = *tag_ids.entry(t.as_str().into()).or_insert(next);
                if id == next {
                    tags.push(t.as_str().into());
                }
                Some(id)
            }
        };
        if let Err(e) = routes.insert(&r.path, tag, methods) {
            problems.add(format!("{key}.path"), e.0);
        }
    }
    let mut warnings = Vec::new();
    for r in routes.iter() {
        if !r.is_public() && !r.has_tenant && !r.has_account {
            warnings.push(format!(
                "{}: route `{}` has neither {{tenant}} nor {{account}}: no plan applies, so every token is refused on `plan`; make it public or add {{account}}",
                file.display(),
                r.template
            ));
        }
    }

    // plans
    let mut plans = Vec::new();
    let mut plan_ids: HashMap<Box<str>, PlanId> = HashMap::new();
    for (name, entries) in &spec.plans {
        let mut per_tag = vec![MethodSet::NONE; tags.len()];
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("plans.{name}[{i}]");
            let methods = match MethodSet::parse(&entry.methods) {
                Ok(m) => m,
                Err(e) => {
                    problems.add(format!("{key}.methods"), e);
                    continue;
                }
            };
            for t in &entry.tags {
                if t == "*" {
                    per_tag.iter_mut().for_each(|m| *m = m.union(methods));
                } else if let Some(&id) = tag_ids.get(t.as_str()) {
                    per_tag[id as usize] = per_tag[id as usize].union(methods);
                } else {
                    problems.add(
                        format!("{key}.tags"),
                        format!("unknown tag `{t}` (no route has it)"),
                    );
                }
            }
        }
        plan_ids.insert(name.as_str().into(), plans.len() as PlanId);
        plans.push(Plan::new(name, per_tag));
    }
    let plan_headers = spec.plans.keys().map(|n| header_value(n)).collect();
    for name in spec.plans.keys() {
        if !valid_id(name) {
            problems.add(
                format!("plans.{name}"),
                "plan names must be letters, digits, '-', '_', '.' or '~'",
            );
        }
    }

    // accounts, tenants
    let mut accounts = Vec::new();
    let mut account_ids: NameIds<AccountId> = NameIds::default();
    for (name, a) in &spec.accounts {
        if !valid_id(name) {
            problems.add(
                format!("accounts.{name}"),
                "account ids must be letters, digits, '-', '_', '.' or '~'",
            );
        }
        let plan = match plan_ids.get(a.plan.as_str()) {
            Some(&p) => p,
            None => {
                problems.add(
                    format!("accounts.{name}.plan"),
                    format!("unknown plan `{}`", a.plan),
                );
                continue;
            }
        };
        account_ids.insert(name.as_str().into(), accounts.len() as AccountId);
        accounts.push(Account {
            name: name.as_str().into(),
            plan,
            header: header_value(name),
        });
    }
    let mut tenants = Vec::new();
    let mut tenant_ids: NameIds<TenantId> = NameIds::default();
    for (name, t) in &spec.tenants {
        if !valid_id(name) {
            problems.add(
                format!("tenants.{name}"),
                "tenant ids must be letters, digits, '-', '_', '.' or '~'",
            );
        }
        let Some(&account) = account_ids.get(t.account.as_str()) else {
            problems.add(
                format!("tenants.{name}.account"),
                format!("unknown account `{}`", t.account),
            );
            continue;
        };
        let plan = match &t.plan {
            None => accounts[account as usize].plan,
            Some(p) => match plan_ids.get(p.as_str()) {
                Some(&id) => id,
                None => {
                    problems.add(
                        format!("tenants.{name}.plan"),
                        format!("unknown plan `{p}`"),
                    );
                    continue;
                }
            },
        };
        tenant_ids.insert(name.as_str().into(), tenants.len() as TenantId);
        tenants.push(Tenant {
            name: name.as_str().into(),
            account,
            plan,
            header: header_value(name),
        });
    }

    // JWT keys
    let mut jwt = JwtKeys::default();
    if let Some(j) = &spec.tokens.jwt {
        jwt.issuer = j.issuer.clone();
        jwt.audience = j.audience.clone();
        jwt.leeway = i64::try_from(j.leeway.as_secs()).unwrap_or(i64::MAX);
        jwt.cache = (j.cache_size > 0).then(|| crate::token::jwt::JwtCache::new(j.cache_size));
        for (i, k) in j.keys.iter().enumerate() {
            let key = format!("tokens.jwt.keys[{i}]");
            if k.kid.is_empty() {
                problems.add(format!("{key}.kid"), "is empty");
                continue;
            }
            if jwt.keys.contains_key(k.kid.as_str()) {
                problems.add(format!("{key}.kid"), format!("`{}` is listed twice", k.kid));
                continue;
            }
            let alg = match parse_alg(&k.alg) {
                Ok(a) => a,
                Err(e) => {
                    problems.add(format!("{key}.alg"), e);
                    continue;
                }
            };
            let loaded = match (&k.public_key, &k.secret_env, is_hmac(alg)) {
                (None, Some(var), true) => match env(var) {
                    Some(secret) => JwtKey::from_secret(&k.kid, alg, secret.as_bytes())
                        .map_err(|e| (format!("{key}.secret_env"), format!("{var}: {e}"))),
                    None => Err((
                        format!("{key}.secret_env"),
                        format!("environment variable {var} is not set"),
                    )),
                },
                (Some(p), None, false) => {
                    let path = resolve(p);
                    match read_file(&path, &mut files) {
                        Ok(pem) => JwtKey::from_pem(&k.kid, alg, &pem).map_err(|e| {
                            (
                                format!("{key}.public_key"),
                                format!("{}: {e}", path.display()),
                            )
                        }),
                        Err(e) => Err((format!("{key}.public_key"), e.to_string())),
                    }
                }
                (_, _, true) => Err((
                    key.clone(),
                    format!("{} needs `secret_env` and no `public_key`", k.alg),
                )),
                (_, _, false) => Err((
                    key.clone(),
                    format!("{} needs `public_key` and no `secret_env`", k.alg),
                )),
            };
            match loaded {
                Ok(jk) => {
                    jwt.keys.insert(k.kid.as_str().into(), jk);
                }
                Err((key, msg)) => problems.add(key, msg),
            }
        }
        if let Some(js) = &j.jwks {
            jwt.jwks =
                compile_jwks(js, &resolve, &mut files, &mut problems).map(std::sync::Arc::new);
        }
    }
    let attenuation = spec.attenuation.as_ref().and_then(|a| {
        compile_attenuation(a, &resolve, &mut files, &mut jwt, &mut problems)
            .map(std::sync::Arc::new)
    });
    // The endpoint is answered before routing: a route it would hide is a
    // configuration error, not a silent shadow.
    if let Some(att) = &attenuation
        && let Some(m) = routes.at(&att.path)
    {
        problems.add(
            "attenuation.path",
            format!(
                "`{}` is also matched by route `{}`",
                att.path, m.route.template
            ),
        );
    }
    let introspection = spec.tokens.introspection.as_ref().and_then(|i| {
        compile_introspection(i, &resolve, env, &mut files, &mut problems).map(std::sync::Arc::new)
    });

    let tag_headers = tags.iter().map(|t| header_value(t)).collect();
    let mut snapshot = Snapshot {
        source: file.to_path_buf(),
        loaded_at: SystemTime::now(),
        listen_addr,
        tls,
        admin_addr,
        upstream,
        mode: spec.mode,
        limits: spec.limits,
        metrics: spec.metrics,
        usage: spec.usage,
        routes,
        tags,
        tag_ids,
        tag_headers,
        plans,
        plan_ids,
        plan_headers,
        accounts,
        account_ids,
        tenants,
        tenant_ids,
        roles: HashMap::new(),
        pats: PatStore::default(),
        jwt,
        attenuation,
        introspection,
        files: Vec::new(),
        warnings,
    };

    // Roles: checked like a PAT record's cube (unknown methods, tags and
    // paths are errors), then added to the vocabulary.
    for (name, role) in &spec.roles {
        let key = format!("roles.{name}");
        if !crate::token::is_safe_identity(name) || name.contains(':') {
            problems.add(
                key,
                "a role name is 1-256 visible ASCII characters without `:` (that is the tag:verb form)",
            );
            continue;
        }
        let as_cube = crate::scope::CubeSpec {
            methods: role.methods.clone(),
            tags: role.tags.clone(),
            paths: role.paths.clone(),
            ..Default::default()
        };
        if role.methods.is_empty() || (role.tags.is_empty() && role.paths.is_empty()) {
            problems.add(
                key,
                "needs `methods` and at least one of `tags` and `paths`",
            );
            continue;
        }
        match as_cube.compile(&snapshot.vocabulary(), crate::scope::Strictness::Config) {
            Ok(_) => {
                snapshot.roles.insert(name.as_str().into(), role.clone());
            }
            Err(e) => problems.add(key, e),
        }
    }

    // The PAT file is compiled against the finished vocabulary.
    if let Some(p) = &spec.tokens.pat_file {
        let path = resolve(p);
        match read_file(&path, &mut files) {
            Ok(bytes) => match load_pats(&path, &bytes, &snapshot) {
                Ok(store) => snapshot.pats = store,
                Err(mut errs) => problems.list.append(&mut errs),
            },
            Err(e) => problems.list.push(e),
        }
    }
    snapshot.files = files;

    if problems.list.is_empty() {
        Ok(snapshot)
    } else {
        Err(ConfigErrors(problems.list))
    }
}

fn compile_upstream(u: &UpstreamSpec, problems: &mut Problems<'_>) -> Upstream {
    let fallback = || Upstream {
        scheme: http::uri::Scheme::HTTP,
        authority: http::uri::Authority::from_static("127.0.0.1"),
        connect_timeout: u.connect_timeout,
        timeout: u.timeout,
        forward_authorization: u.forward_authorization,
        http2: u.http2,
        ca: None,
        ca_sha256: None,
    };
    let uri = match u.url.parse::<http::Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            problems.add("upstream.url", format!("`{}` is not a URL ({e})", u.url));
            return fallback();
        }
    };
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        problems.add(
            "upstream.url",
            format!("`{}` needs a scheme and a host", u.url),
        );
        return fallback();
    };
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        problems.add(
            "upstream.url",
            format!("scheme `{scheme}` is not http or https"),
        );
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        problems.add(
            "upstream.url",
            "must not have a path or query: the request path is forwarded as checked",
        );
    }
    if authority.as_str().contains('@') {
        problems.add("upstream.url", "must not carry credentials");
    }
    if u.timeout.is_zero() || u.connect_timeout.is_zero() {
        problems.add("upstream.timeout", "timeouts must be greater than zero");
    }
    Upstream {
        scheme,
        authority,
        connect_timeout: u.connect_timeout,
        timeout: u.timeout,
        forward_authorization: u.forward_authorization,
        http2: u.http2,
        ca: None,
        ca_sha256: None,
    }
}

/// An `https://` URL for a token source, or why not. Plain HTTP would let
/// anyone on the path hand the gateway keys or identities.
fn source_url(raw: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| format!("`{raw}` is not a URL ({e})"))?;
    if uri.scheme() != Some(&http::uri::Scheme::HTTPS) {
        return Err(format!("`{raw}` must be https://"));
    }
    match uri.authority() {
        None => Err(format!("`{raw}` has no host")),
        Some(a) if a.as_str().contains('@') => Err("must not carry credentials in the URL".into()),
        Some(_) => Ok(uri),
    }
}

fn compile_jwks(
    js: &JwksSpec,
    resolve: &dyn Fn(&str) -> PathBuf,
    files: &mut Vec<LoadedFile>,
    problems: &mut Problems<'_>,
) -> Option<crate::token::jwks::Jwks> {
    use crate::token::jwks::{Jwks, JwksLocation, JwksSettings, parse};
    let before = problems.list.len();
    if js.refresh.is_zero() || js.timeout.is_zero() {
        problems.add(
            "tokens.jwt.jwks",
            "refresh and timeout must be greater than zero",
        );
    }
    let (ca, ca_sha256) = optional_ca(
        js.ca.as_deref(),
        "tokens.jwt.jwks.ca",
        resolve,
        files,
        problems,
    );
    let mut initial = None;
    let location = match (&js.file, &js.url) {
        (Some(f), None) => {
            let path = resolve(f);
            // A file is read now, so `check` and a reload see its errors and
            // requests never wait for it.
            match read_file(&path, files) {
                Ok(bytes) => match parse(&bytes) {
                    Ok(set) => initial = Some(set),
                    Err(m) => {
                        problems.add("tokens.jwt.jwks.file", format!("{}: {m}", path.display()))
                    }
                },
                Err(e) => problems.list.push(e),
            }
            JwksLocation::File(path)
        }
        (None, Some(u)) => match source_url(u) {
            Ok(uri) => JwksLocation::Url(uri),
            Err(m) => {
                problems.add("tokens.jwt.jwks.url", m);
                return None;
            }
        },
        _ => {
            problems.add("tokens.jwt.jwks", "needs exactly one of `file` and `url`");
            return None;
        }
    };
    if problems.list.len() != before {
        return None;
    }
    let settings = JwksSettings {
        location,
        ca,
        ca_sha256,
        refresh: js.refresh,
        timeout: js.timeout,
        min_refetch: js.min_refetch,
    };
    Jwks::new(settings, initial)
        .map_err(|m| problems.add("tokens.jwt.jwks", m))
        .ok()
}

fn compile_attenuation(
    a: &AttenuationSpec,
    resolve: &dyn Fn(&str) -> PathBuf,
    files: &mut Vec<LoadedFile>,
    jwt: &mut JwtKeys,
    problems: &mut Problems<'_>,
) -> Option<crate::attenuate::Attenuator> {
    let alg = match a.alg.as_str() {
        "ES256" => jsonwebtoken::Algorithm::ES256,
        "EdDSA" => jsonwebtoken::Algorithm::EdDSA,
        other => {
            problems.add("attenuation.alg", format!("`{other}`: use ES256 or EdDSA"));
            return None;
        }
    };
    if !a.path.starts_with('/')
        || crate::path::canonicalize(&a.path).ok().as_deref() != Some(a.path.as_str())
    {
        problems.add("attenuation.path", "must be a canonical absolute path");
        return None;
    }
    if a.max_ttl.is_zero() {
        problems.add("attenuation.max_ttl", "must be greater than zero");
        return None;
    }
    if !crate::token::is_safe_identity(&a.kid) || jwt.keys.contains_key(a.kid.as_str()) {
        problems.add(
            "attenuation.kid",
            format!(
                "`{}` must be a header-safe kid not used by tokens.jwt.keys",
                a.kid
            ),
        );
        return None;
    }
    let private = resolve(&a.private_key);
    let public = resolve(&a.public_key);
    let private_pem = match read_file(&private, files) {
        Ok(b) => b,
        Err(e) => {
            problems.list.push(e);
            return None;
        }
    };
    let public_pem = match read_file(&public, files) {
        Ok(b) => b,
        Err(e) => {
            problems.list.push(e);
            return None;
        }
    };
    let att = match crate::attenuate::Attenuator::new(
        a.path.clone(),
        a.kid.clone(),
        alg,
        &private_pem,
        a.max_ttl,
    ) {
        Ok(att) => att,
        Err(m) => {
            problems.add(
                "attenuation.private_key",
                format!("{}: {m}", private.display()),
            );
            return None;
        }
    };
    let key = match JwtKey::from_pem(&a.kid, alg, &public_pem) {
        Ok(k) => k,
        Err(m) => {
            problems.add(
                "attenuation.public_key",
                format!("{}: {m}", public.display()),
            );
            return None;
        }
    };
    // The two halves must belong together, or minted tokens would never verify.
    let probe = b"scopegate attenuation key check";
    let matches = att
        .sign(probe)
        .ok()
        .is_some_and(|sig| key.verify(&sig, probe));
    if !matches {
        problems.add(
            "attenuation.public_key",
            "does not match attenuation.private_key",
        );
        return None;
    }
    jwt.keys.insert(a.kid.as_str().into(), key);
    Some(att)
}

fn compile_introspection(
    i: &IntrospectionSpec,
    resolve: &dyn Fn(&str) -> PathBuf,
    env: EnvLookup<'_>,
    files: &mut Vec<LoadedFile>,
    problems: &mut Problems<'_>,
) -> Option<crate::token::introspect::Introspector> {
    use crate::token::introspect::{IntrospectionSettings, Introspector};
    let before = problems.list.len();
    let url = source_url(&i.url)
        .map_err(|m| problems.add("tokens.introspection.url", m))
        .ok();
    let mut credential = |key: &str, var: &str| -> Option<String> {
        match env(var) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                problems.add(
                    format!("tokens.introspection.{key}"),
                    format!("environment variable {var} is not set"),
                );
                None
            }
        }
    };
    let client_id = credential("client_id_env", &i.client_id_env);
    let client_secret = credential("client_secret_env", &i.client_secret_env);
    if i.timeout.is_zero() || i.positive_ttl.is_zero() || i.negative_ttl.is_zero() {
        problems.add(
            "tokens.introspection",
            "timeout, positive_ttl and negative_ttl must be greater than zero",
        );
    }
    if i.cache_size == 0 {
        problems.add(
            "tokens.introspection.cache_size",
            "must be at least 1 (every PAT would cost a call to the endpoint)",
        );
    }
    let (ca, ca_sha256) = optional_ca(
        i.ca.as_deref(),
        "tokens.introspection.ca",
        resolve,
        files,
        problems,
    );
    let (Some(url), Some(client_id), Some(client_secret)) = (url, client_id, client_secret) else {
        return None;
    };
    if problems.list.len() != before {
        return None;
    }
    Introspector::new(IntrospectionSettings {
        url,
        client_id,
        client_secret,
        ca,
        ca_sha256,
        timeout: i.timeout,
        positive_ttl: i.positive_ttl,
        negative_ttl: i.negative_ttl,
        cache_size: i.cache_size,
    })
    .map_err(|m| problems.add("tokens.introspection", m))
    .ok()
}

/// An optional `ca:` key: its root store and SHA-256, or nothing (a problem
/// is recorded when the file cannot be used).
fn optional_ca(
    path: Option<&str>,
    key: &str,
    resolve: &dyn Fn(&str) -> PathBuf,
    files: &mut Vec<LoadedFile>,
    problems: &mut Problems<'_>,
) -> (Option<rustls::RootCertStore>, Option<String>) {
    let Some(path) = path else {
        return (None, None);
    };
    match load_ca(&resolve(path), key, files) {
        Ok((roots, sha)) => (Some(roots), Some(sha)),
        Err(e) => {
            problems.list.push(e);
            (None, None)
        }
    }
}

/// Read a `ca:` file into a root store. Errors name the file and key.
fn load_ca(
    path: &Path,
    key: &str,
    files: &mut Vec<LoadedFile>,
) -> Result<(rustls::RootCertStore, String), ConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bytes = read_file(path, files)?;
    let sha = sha256_hex(&bytes);
    let invalid = |message: String| ConfigError::Invalid {
        file: path.to_path_buf(),
        key: key.into(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| invalid(format!("not a PEM certificate bundle ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("unusable CA certificate ({e})")))?;
    }
    if roots.is_empty() {
        return Err(invalid("holds no certificate".into()));
    }
    Ok((roots, sha))
}

/// A compiled PAT record, or the key and message of why it is not.
type Compiled = Result<([u8; 32], crate::token::pat::PatRecord), (String, String)>;

/// Records per chunk when a large block-style PAT list is parsed in pieces:
/// small enough that serde_yaml's buffered events stay a few MB, large
/// enough that the per-chunk cost is noise.
const PAT_CHUNK: usize = 1_000;

fn load_pats(path: &Path, bytes: &[u8], snapshot: &Snapshot) -> Result<PatStore, Vec<ConfigError>> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        vec![ConfigError::Parse {
            file: path.to_path_buf(),
            line: None,
            column: None,
            message: "not UTF-8".into(),
        }]
    })?;
    let vocab = snapshot.vocabulary();
    let compiled = compile_pat_file(path, text, &vocab).map_err(|e| vec![e])?;

    let mut problems = Problems {
        file: path,
        list: Vec::new(),
    };
    let mut store = PatStore::with_capacity(compiled.len());
    let mut ids: HashMap<Box<str>, usize> = HashMap::with_capacity(compiled.len());
    for (i, result) in compiled.into_iter().enumerate() {
        match result {
            Ok((hash, record)) => {
                if let Some(first) = ids.insert(record.id.clone(), i) {
                    problems.add(
                        format!("tokens[{i}].id"),
                        format!("`{}` is also the id of tokens[{first}]", record.id),
                    );
                    continue;
                }
                if !store.insert(hash, record) {
                    problems.add(
                        format!("tokens[{i}].sha256"),
                        "the same hash appears in another record",
                    );
                }
            }
            Err((key, msg)) => problems.add(format!("tokens[{i}].{key}"), msg),
        }
    }
    if problems.list.is_empty() {
        Ok(store)
    } else {
        Err(problems.list)
    }
}

/// Worker threads for work over `n` items: all cores for large inputs,
/// one for small ones (threads cost more than they save there).
fn parallelism(n: usize) -> usize {
    if n < 2_000 {
        return 1;
    }
    std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1)
        .min(16)
}

/// Compile `specs` on `threads` threads, in order.
fn compile_all(specs: &[PatRecordSpec], vocab: &Vocabulary<'_>) -> Vec<Compiled> {
    let threads = parallelism(specs.len());
    let per = specs.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = specs
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || chunk.iter().map(|r| r.compile(vocab)).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Parse and compile a PAT file, records in file order.
///
/// - JSON (which is valid YAML) takes serde_json, which streams.
/// - A large block-style YAML list is cut into chunks of [`PAT_CHUNK`]
///   records; worker threads take chunks in turn and compile each as soon
///   as it is parsed, so only a few chunks' worth of parser state is alive
///   at once (serde_yaml buffers a whole document's events: parsing 100k
///   records as one document peaked at ~650 MB).
/// - Any other shape, and any chunk that does not parse, takes serde_yaml
///   over the whole file, so errors and their line numbers stay exact.
fn compile_pat_file(
    path: &Path,
    text: &str,
    vocab: &Vocabulary<'_>,
) -> Result<Vec<Compiled>, ConfigError> {
    compile_pat_file_in(path, text, vocab, PAT_CHUNK)
}

/// The PAT file compiled twice, through the chunked path with `per_chunk`
/// records per chunk and as one serde_yaml document, each result rendered
/// with `Debug`. The two must be equal for every input: the fuzz targets
/// and property tests check it (the chunk splitter is hand-written).
#[doc(hidden)]
pub fn pat_file_both_ways(
    text: &str,
    per_chunk: usize,
    vocab: &Vocabulary<'_>,
) -> (String, String) {
    let path = Path::new("tokens.yaml");
    let chunked = compile_pat_file_in(path, text, vocab, per_chunk);
    let whole = serde_yaml::from_str::<PatFileSpec>(text)
        .map_err(|e| parse_error(path, e))
        .map(|f| compile_all(&f.tokens, vocab));
    (format!("{chunked:?}"), format!("{whole:?}"))
}

fn compile_pat_file_in(
    path: &Path,
    text: &str,
    vocab: &Vocabulary<'_>,
    per_chunk: usize,
) -> Result<Vec<Compiled>, ConfigError> {
    if text.trim_start().starts_with('{') {
        let file = serde_json::from_str::<PatFileSpec>(text).map_err(|e| ConfigError::Parse {
            file: path.to_path_buf(),
            line: Some(e.line()),
            column: Some(e.column()),
            message: e.to_string(),
        })?;
        return Ok(compile_all(&file.tokens, vocab));
    }
    if let Some(chunks) = split_pat_list(text, per_chunk) {
        let threads = parallelism(chunks.len() * per_chunk).min(chunks.len());
        let per_thread: Vec<Vec<(usize, Option<Vec<Compiled>>)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let chunks = &chunks;
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        for (i, chunk) in chunks.iter().enumerate().skip(t).step_by(threads) {
                            let compiled = serde_yaml::from_str::<PatFileSpec>(chunk)
                                .ok()
                                .map(|f| f.tokens.iter().map(|r| r.compile(vocab)).collect());
                            let failed = compiled.is_none();
                            out.push((i, compiled));
                            if failed {
                                break;
                            }
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let mut ordered: Vec<Option<Vec<Compiled>>> = (0..chunks.len()).map(|_| None).collect();
        for (i, compiled) in per_thread.into_iter().flatten() {
            if let Some(slot) = ordered.get_mut(i) {
                *slot = compiled;
            }
        }
        if ordered.iter().all(Option::is_some) {
            return Ok(ordered.into_iter().flatten().flatten().collect());
        }
    }
    let file = serde_yaml::from_str::<PatFileSpec>(text).map_err(|e| parse_error(path, e))?;
    Ok(compile_all(&file.tokens, vocab))
}

/// Split a PAT file of the plain shape `tokens:` followed by a block list
/// into documents of the same shape, each holding `per_chunk` whole items
/// (the last one fewer).
/// Returns `None` for any other shape (another top-level line, document
/// markers, flow style, odd indentation), which then parses as one
/// document. An item is split off only at a line that starts exactly at the
/// list's indentation with `- `; YAML cannot continue a scalar or a
/// collection of a deeper item on such a line, and a chunk cut mid-construct
/// fails to parse and sends the whole file to the sequential parser.
fn split_pat_list(text: &str, per_chunk: usize) -> Option<Vec<String>> {
    // Anchors: serde_yaml resolves an alias to the *last* definition of its
    // anchor anywhere in the document, and a chunk sees only its own. With
    // an anchor defined twice, a chunk holding the first definition and the
    // alias would parse, and disagree with the whole file (found by
    // tests/properties `pat_files`). A `&` outside an anchor can only sit in
    // a quoted scalar, which costs the file its parallel parse, nothing more.
    if per_chunk == 0 || text.contains('&') {
        return None;
    }
    let mut starts: Vec<usize> = Vec::new();
    let mut seen_key = false;
    let mut indent: Option<usize> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let at = offset;
        offset += line.len();
        let content = line.trim_end_matches(['\n', '\r']);
        let trimmed = content.trim_start_matches(' ');
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let depth = content.len() - trimmed.len();
        if !seen_key {
            let key = content.split('#').next().unwrap_or("").trim_end();
            if depth != 0 || key != "tokens:" {
                return None;
            }
            seen_key = true;
            continue;
        }
        let item = trimmed == "-" || trimmed.starts_with("- ");
        match indent {
            None if item => indent = Some(depth),
            None => return None,
            Some(d) if depth < d => return None,
            Some(d) if depth == d && !item => return None,
            Some(_) => {}
        }
        if item && Some(depth) == indent {
            starts.push(at);
        }
    }
    if starts.len() < 2 * per_chunk {
        return None;
    }
    let per = per_chunk;
    let mut chunks = Vec::with_capacity(starts.len().div_ceil(per));
    for k in 0..starts.len().div_ceil(per) {
        let to = starts.get((k + 1) * per).copied().unwrap_or(text.len());
        // The first chunk keeps the file's own preamble (comments and the
        // `tokens:` line), so whatever serde_yaml would refuse there — a
        // control character in a comment, say — is refused here too (the
        // pat_file fuzz target found the preamble was not parsed at all).
        let doc = if k == 0 {
            text[..to].to_string()
        } else {
            let from = starts[k * per];
            let mut doc = String::with_capacity(to - from + 8);
            doc.push_str("tokens:\n");
            doc.push_str(&text[from..to]);
            doc
        };
        chunks.push(doc);
    }
    Some(chunks)
}

/// A small valid configuration for unit tests across the crate: two plans,
/// an account, two tenants (one overriding the plan), a public route and
/// three tagged ones.
#[cfg(test)]
pub(crate) const TEST_CONFIG: &str = r#"
listen: { addr: "127.0.0.1:0" }
upstream: { url: "http://127.0.0.1:9" }
plans:
  free:
    - { tags: [analytics], methods: [GET] }
  pro:
    - { tags: ["*"], methods: ["*"] }
accounts:
  acme: { plan: pro }
tenants:
  acme-prod: { account: acme }
  acme-trial: { account: acme, plan: free }
routes:
  - { path: /v1/health, public: true }
  - { path: "/v1/tenants/{tenant}/analytics/{*rest}", tag: analytics, methods: [GET] }
  - { path: "/v1/tenants/{tenant}/rules", tag: rules, methods: [GET, POST] }
  - { path: "/v1/accounts/{account}", tag: accounts }
"#;

#[cfg(test)]
mod tests {
    use super::TEST_CONFIG as BASE;
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_str(text: &str) -> Result<Snapshot, ConfigErrors> {
        from_yaml(text, Path::new("/etc/scopegate/gateway.yaml"), &no_env)
    }

    fn errors(text: &str) -> String {
        match load_str(text) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn base_config_compiles() {
        let s = load_str(BASE).expect("valid");
        assert_eq!(s.routes.len(), 4);
        assert_eq!(s.tags.len(), 3);
        let trial = s.tenant_ids["acme-trial"];
        assert_eq!(
            &*s.plans[s.tenants[trial as usize].plan as usize].name,
            "free"
        );
        let prod = s.tenant_ids["acme-prod"];
        assert_eq!(
            &*s.plans[s.tenants[prod as usize].plan as usize].name,
            "pro"
        );
        assert_eq!(s.upstream.timeout, Duration::from_secs(30));
        assert!(s.warnings.is_empty());
    }

    /// A parse error names the file, then as much of the place as is
    /// known; a list of problems is one per line.
    #[test]
    fn a_parse_error_says_where_as_far_as_it_knows() {
        let error = |line, column| ConfigError::Parse {
            file: "/etc/scopegate/gateway.yaml".into(),
            line,
            column,
            message: "bad".into(),
        };
        let at = |line, column| error(line, column).to_string();
        assert_eq!(at(Some(3), Some(7)), "/etc/scopegate/gateway.yaml:3:7: bad");
        assert_eq!(at(Some(3), None), "/etc/scopegate/gateway.yaml:3: bad");
        assert_eq!(at(None, None), "/etc/scopegate/gateway.yaml: bad");
        let one = ConfigErrors::from(error(Some(1), Some(2))).to_string();
        assert_eq!(one, "/etc/scopegate/gateway.yaml:1:2: bad");
        let three = ConfigErrors(vec![
            error(Some(1), Some(2)),
            error(Some(3), Some(4)),
            error(None, None),
        ]);
        assert_eq!(
            three.to_string(),
            "/etc/scopegate/gateway.yaml:1:2: bad\n\
             /etc/scopegate/gateway.yaml:3:4: bad\n\
             /etc/scopegate/gateway.yaml: bad"
        );
    }

    /// What a file leaves out takes the defaults SPEC §3 and the README
    /// give, whether its section is missing or empty.
    #[test]
    fn what_the_file_leaves_out_takes_the_documented_defaults() {
        let jwt = "tokens:\n  jwt:\n    keys:\n      - { kid: k1, alg: HS256, secret_env: S }\n";
        let secret = |_: &str| Some("0123456789abcdef0123456789abcdef".to_string());
        let limits = LimitsSpec {
            max_header_bytes: 16_384,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
        };
        for extra in ["", "limits: {}\nusage: {}\n"] {
            let yaml = format!("{BASE}{jwt}{extra}");
            let s = from_yaml(&yaml, Path::new("g.yaml"), &secret).expect("valid");
            assert_eq!(s.upstream.connect_timeout, Duration::from_secs(2));
            assert_eq!(s.upstream.timeout, Duration::from_secs(30));
            assert!(!s.upstream.forward_authorization && !s.upstream.http2);
            assert_eq!(s.mode, Mode::Enforce);
            assert_eq!(s.jwt.leeway, 30);
            assert_eq!(s.jwt.cache.as_ref().map(|c| c.capacity()), Some(10_000));
            assert_eq!(
                serde_json::to_value(&s.limits).expect("json"),
                serde_json::to_value(&limits).expect("json"),
                "{extra:?}"
            );
            assert!(s.usage.enabled);
            assert_eq!((s.usage.max_tokens, s.usage.max_calls), (10_000, 256));
            assert!(!s.metrics.tenant_label);
        }
        // The token sources' and the attenuation endpoint's own sections.
        let jwks: JwksSpec = serde_yaml::from_str("url: https://idp.example/jwks").expect("jwks");
        assert_eq!(
            (jwks.refresh, jwks.timeout, jwks.min_refetch),
            (
                Duration::from_secs(300),
                Duration::from_secs(2),
                Duration::from_secs(10)
            )
        );
        let i: IntrospectionSpec = serde_yaml::from_str(
            "{ url: https://idp.example/introspect, client_id_env: A, client_secret_env: B }",
        )
        .expect("introspection");
        assert_eq!(
            (i.timeout, i.positive_ttl, i.negative_ttl, i.cache_size),
            (
                Duration::from_secs(2),
                Duration::from_secs(60),
                Duration::from_secs(5),
                10_000
            )
        );
        let a: AttenuationSpec = serde_yaml::from_str(
            "{ kid: a1, alg: ES256, private_key: a.pem, public_key: a.pub.pem }",
        )
        .expect("attenuation");
        assert_eq!(
            (a.path.as_str(), a.max_ttl),
            ("/_scopegate/v1/tokens", Duration::from_secs(900))
        );
        let yaml = format!("{BASE}{jwt}    leeway: 5s\n    cache_size: 0\n");
        let s = from_yaml(&yaml, Path::new("g.yaml"), &secret).expect("valid");
        assert_eq!(s.jwt.leeway, 5);
        assert!(s.jwt.cache.is_none());
    }

    #[test]
    fn unknown_keys_are_errors_with_line_and_key() {
        let e = errors(&BASE.replace("acme: { plan: pro }", "acme: { plan: pro, plna: free }"));
        assert!(e.contains("/etc/scopegate/gateway.yaml:"), "{e}");
        assert!(e.contains("plna"), "{e}");
        let e = errors(&BASE.replace("methods: [GET, POST]", "methods: [GET, POST], tga: x"));
        assert!(e.contains("tga") && e.contains("routes[2]"), "{e}");
        assert!(e.contains(":17:"), "line number of the bad route: {e}");
    }

    #[test]
    fn semantic_errors_name_key_and_are_all_reported() {
        let bad = BASE
            .replace("acme: { plan: pro }", "acme: { plan: gold }")
            .replace(
                "tags: [analytics], methods: [GET]",
                "tags: [analitics], methods: [GOT]",
            )
            .replace(
                "acme-trial: { account: acme, plan: free }",
                "acme-trial: { account: initech }",
            );
        let e = errors(&bad);
        assert!(e.contains("accounts.acme.plan: unknown plan `gold`"), "{e}");
        assert!(
            e.contains("plans.free[0].methods: unknown method `GOT`"),
            "{e}"
        );
        assert!(
            e.contains("tenants.acme-trial.account: unknown account `initech`"),
            "{e}"
        );
    }

    #[test]
    fn plan_naming_unknown_tag_is_an_error() {
        let e = errors(&BASE.replace(
            "tags: [analytics], methods: [GET]",
            "tags: [analitics], methods: [GET]",
        ));
        assert!(
            e.contains("plans.free[0].tags: unknown tag `analitics`"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_and_conflicting_templates_are_errors() {
        let dup = BASE.replace(
            "  - { path: /v1/health, public: true }",
            "  - { path: /v1/health, public: true }\n  - { path: /v1/health, public: true }",
        );
        assert!(errors(&dup).contains("routes[1].path"));
        let conflict = BASE.replace(
            "  - { path: /v1/health, public: true }",
            "  - { path: \"/v1/tenants/{t}/rules\", tag: rules }",
        );
        let e = errors(&conflict);
        assert!(
            e.contains("routes[2].path") && e.contains("conflict"),
            "{e}"
        );
    }

    #[test]
    fn route_tag_and_public_rules() {
        let e = errors(&BASE.replace("{ path: /v1/health, public: true }", "{ path: /v1/health }"));
        assert!(e.contains("routes[0].tag: missing"), "{e}");
        let e = errors(&BASE.replace(
            "{ path: /v1/health, public: true }",
            "{ path: /v1/health, public: true, tag: x }",
        ));
        assert!(e.contains("routes[0].tag"), "{e}");
        let e = errors(&BASE.replace("methods: [GET, POST]", "methods: [GET, HEAD]"));
        assert!(e.contains("routes[2].methods"), "{e}");
    }

    /// Tag, plan, account and tenant names end up in paths and headers:
    /// 1 to 128 unreserved URI characters, each kind checked.
    #[test]
    fn names_are_unreserved_characters_and_bounded() {
        let long = "a".repeat(128);
        for good in ["a-b.c_d~E9", long.as_str()] {
            let yaml = BASE
                .replace("acme-prod:", &format!("{good}:"))
                .replace("tag: rules", &format!("tag: \"{good}\""));
            load_str(&yaml).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let too_long = "a".repeat(129);
        for bad in [
            "acme/prod",
            "acme prod",
            "é",
            "a%2f",
            "a:b",
            too_long.as_str(),
        ] {
            let cases = [
                (
                    BASE.replace("acme-prod:", &format!("\"{bad}\":")),
                    format!("tenants.{bad}: tenant ids must be"),
                ),
                (
                    BASE.replace(
                        "  acme: { plan: pro }",
                        &format!("  \"{bad}\": {{ plan: pro }}"),
                    )
                    .replace("account: acme", &format!("account: \"{bad}\"")),
                    format!("accounts.{bad}: account ids must be"),
                ),
                (
                    BASE.replace("  pro:", &format!("  \"{bad}\":"))
                        .replace("plan: pro", &format!("plan: \"{bad}\"")),
                    format!("plans.{bad}: plan names must be"),
                ),
                (
                    BASE.replace("tag: rules", &format!("tag: \"{bad}\"")),
                    "routes[2].tag: `".to_string(),
                ),
            ];
            for (yaml, want) in cases {
                let e = errors(&yaml);
                assert!(e.contains(&want), "{bad}: want {want} in {e}");
            }
        }
        let e = errors(&BASE.replace("acme-prod:", "\"\":"));
        assert!(e.contains("tenants.: tenant ids must be"), "{e}");
    }

    /// A role is checked as a cube would be: its paths and tags must
    /// exist, it needs methods and something to apply them to, and its
    /// name cannot take the `tag:verb` form.
    #[test]
    fn roles_are_checked_against_the_routes() {
        let with = |roles: &str| format!("{BASE}roles:\n{roles}");
        let s = load_str(&with(
            "  rule-reader: { methods: [GET], paths: [\"/v1/tenants/{tenant}/rules\"] }\n  viewer: { methods: [GET], tags: [\"*\"] }\n",
        ))
        .expect("valid");
        assert_eq!(s.roles.len(), 2);
        for (role, want) in [
            (
                "  r: { methods: [GET], paths: [\"/v1/tenants/{tenant}/nope\"] }\n",
                "roles.r:",
            ),
            ("  r: { methods: [GET], tags: [nope] }\n", "roles.r:"),
            (
                "  r: { methods: [], tags: [rules] }\n",
                "roles.r: needs `methods`",
            ),
            ("  r: { methods: [GET] }\n", "roles.r: needs `methods`"),
            ("  r: { methods: [FETCH], tags: [rules] }\n", "roles.r:"),
            (
                "  \"rules:read\": { methods: [GET], tags: [rules] }\n",
                "roles.rules:read: a role name",
            ),
        ] {
            let e = errors(&with(role));
            assert!(e.contains(want), "{role}: want {want} in {e}");
        }
    }

    /// A route that lists no method would accept none; a zero timeout
    /// would fail every request.
    #[test]
    fn empty_method_lists_and_zero_timeouts_are_refused() {
        let e = errors(&BASE.replace("methods: [GET, POST]", "methods: []"));
        assert!(e.contains("routes[2].methods: is empty"), "{e}");
        for timeouts in ["timeout: 0s", "connect_timeout: 0s"] {
            let e = errors(&BASE.replace(
                "upstream: { url: \"http://127.0.0.1:9\" }",
                &format!("upstream: {{ url: \"http://127.0.0.1:9\", {timeouts} }}"),
            ));
            assert!(
                e.contains("upstream.timeout: timeouts must be greater than zero"),
                "{e}"
            );
        }
    }

    /// The token sources' URLs are https:// without credentials (they would
    /// reach logs and `/config`); introspection's client credentials must
    /// be set and not empty, and its times greater than zero.
    #[test]
    fn token_source_settings_are_checked() {
        let env = |name: &str| match name {
            "ID" => Some("scopegate".to_string()),
            "SECRET" => Some("s3cret-s3cret".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let with = |extra: &str| {
            format!(
                "{BASE}tokens:\n  introspection: {{ url: \"https://idp.example/introspect\", client_id_env: ID, client_secret_env: SECRET{extra} }}\n"
            )
        };
        let load = |yaml: &str| from_yaml(yaml, Path::new("g.yaml"), &env);
        load(&with("")).expect("valid");
        let refused = |yaml: &str| match load(yaml) {
            Ok(_) => panic!("must fail: {yaml}"),
            Err(e) => e.to_string(),
        };
        let e = refused(&with("").replace("https://", "https://user:pw@"));
        assert!(
            e.contains("tokens.introspection.url: must not carry credentials"),
            "{e}"
        );
        assert!(!e.contains("pw@"), "{e}");
        let e = refused(&with("").replace("https://", "http://"));
        assert!(e.contains("must be https://"), "{e}");
        let e = refused(&with("").replace("client_secret_env: SECRET", "client_secret_env: EMPTY"));
        assert!(
            e.contains(
                "tokens.introspection.client_secret_env: environment variable EMPTY is not set"
            ),
            "{e}"
        );
        for zero in ["timeout: 0s", "positive_ttl: 0s", "negative_ttl: 0s"] {
            let e = refused(&with(&format!(", {zero}")));
            assert!(e.contains("must be greater than zero"), "{zero}: {e}");
        }
        let e = refused(&with(", cache_size: 0"));
        assert!(e.contains("tokens.introspection.cache_size"), "{e}");
        let jwks = format!(
            "{BASE}tokens:\n  jwt:\n    jwks: {{ url: \"https://k:v@idp.example/jwks\" }}\n"
        );
        let e = refused(&jwks);
        assert!(
            e.contains("tokens.jwt.jwks.url: must not carry credentials"),
            "{e}"
        );
    }

    /// The attenuation endpoint's path is a canonical absolute path.
    #[test]
    fn the_attenuation_path_is_canonical_and_absolute() {
        for path in [
            "_scopegate/v1/tokens",
            "/_scopegate//v1/tokens",
            "/a/../tokens",
        ] {
            let e = errors(&format!(
                "{BASE}attenuation: {{ path: \"{path}\", kid: a1, alg: ES256, private_key: a.pem, public_key: a.pub.pem }}\n"
            ));
            assert!(
                e.contains("attenuation.path: must be a canonical absolute path"),
                "{path}: {e}"
            );
        }
    }

    /// hyper's smallest read buffer is the least head limit.
    #[test]
    fn the_head_limit_is_at_least_8_kib() {
        let e = errors(&format!("{BASE}limits: {{ max_header_bytes: 8191 }}\n"));
        assert!(
            e.contains("limits.max_header_bytes: must be at least 8192"),
            "{e}"
        );
        let s = load_str(&format!("{BASE}limits: {{ max_header_bytes: 8192 }}\n")).expect("valid");
        assert_eq!(s.limits.max_header_bytes, 8192);
        let e = errors(&format!("{BASE}limits: {{ max_connections: 0 }}\n"));
        assert!(
            e.contains("limits.max_connections: must be at least 1"),
            "{e}"
        );
        load_str(&format!("{BASE}limits: {{ max_connections: 1 }}\n")).expect("valid");
    }

    #[test]
    fn bad_durations_and_urls() {
        let e = errors(&BASE.replace(
            "url: \"http://127.0.0.1:9\"",
            "url: \"http://127.0.0.1:9\", timeout: 30",
        ));
        assert!(e.contains("duration"), "{e}");
        let e = errors(&BASE.replace("http://127.0.0.1:9", "ftp://127.0.0.1:9"));
        assert!(e.contains("upstream.url"), "{e}");
        let e = errors(&BASE.replace("http://127.0.0.1:9", "http://127.0.0.1:9/api"));
        assert!(e.contains("upstream.url"), "{e}");
    }

    #[test]
    fn a_list_where_a_mapping_belongs_is_named() {
        let e = errors(&BASE.replace(
            "  acme-prod: { account: acme }\n  acme-trial: { account: acme, plan: free }\n",
            "  - acme-prod\n",
        ));
        assert!(
            e.contains("tenants: invalid type: sequence, expected a mapping"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_yaml_keys_are_refused() {
        let e = errors(&BASE.replace(
            "acme: { plan: pro }",
            "acme: { plan: pro }\n  acme: { plan: free }",
        ));
        assert!(e.contains("duplicate"), "{e}");
    }

    #[test]
    fn missing_secret_env_and_short_secret() {
        let yaml = format!(
            "{BASE}tokens:\n  jwt:\n    keys:\n      - {{ kid: k1, alg: HS256, secret_env: SG_TEST_SECRET }}\n"
        );
        let e = match from_yaml(&yaml, Path::new("g.yaml"), &no_env) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("must fail"),
        };
        assert!(
            e.contains("tokens.jwt.keys[0].secret_env") && e.contains("SG_TEST_SECRET is not set"),
            "{e}"
        );
        let short = |_: &str| Some("short".to_string());
        let e = match from_yaml(&yaml, Path::new("g.yaml"), &short) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("must fail"),
        };
        assert!(e.contains("at least 32 bytes"), "{e}");
        // The secret itself never appears in an error.
        assert!(!e.contains("short\""));
        let long = |_: &str| Some("0123456789abcdef0123456789abcdef".to_string());
        let s = from_yaml(&yaml, Path::new("g.yaml"), &long).expect("valid");
        assert_eq!(s.jwt.keys.len(), 1);
    }

    fn pat_text(n: usize) -> String {
        let mut t = String::from("# a comment before the key\ntokens:   # trailing comment\n");
        for i in 0..n {
            t.push_str(&format!("  - id: tok_{i}\n"));
            if i % 3 == 0 {
                // A block scalar and a quoted value that contain list-like text.
                t.push_str("    name: |\n      line one\n      - not an item\n");
            } else {
                t.push_str("    name: \"a - b\"\n");
            }
            t.push_str(&format!("    sha256: {:064x}\n", i + 1));
            if i % 5 == 0 {
                t.push_str("\n# a comment between items\n");
            }
            t.push_str("    cube: { methods: [GET], tags: [analytics] }\n");
        }
        t
    }

    /// Each chunk parsed on its own, the records joined in order.
    fn parse_chunks(chunks: &[String]) -> Vec<PatRecordSpec> {
        chunks
            .iter()
            .flat_map(|c| {
                let part: PatFileSpec = serde_yaml::from_str(c).expect("chunk parses");
                part.tokens
            })
            .collect()
    }

    #[test]
    fn chunked_pat_parse_equals_the_whole_file_parse() {
        let text = pat_text(500);
        let whole: PatFileSpec = serde_yaml::from_str(&text).expect("whole");
        let chunks = split_pat_list(&text, 125).expect("plain shape is split");
        assert_eq!(chunks.len(), 4);
        let joined = parse_chunks(&chunks);
        assert_eq!(joined.len(), whole.tokens.len());
        for (a, b) in joined.iter().zip(&whole.tokens) {
            assert_eq!(
                (&a.id, &a.name, &a.sha256, &a.cube),
                (&b.id, &b.name, &b.sha256, &b.cube)
            );
        }
        assert_eq!(split_pat_list(&text, 150).map(|c| c.len()), Some(4));
        // The chunked path (more than PAT_CHUNK records) compiles the same
        // records as the whole-file parse, in the same order.
        let big = pat_text(2_600);
        assert!(split_pat_list(&big, PAT_CHUNK).is_some_and(|c| c.len() == 3));
        let snap = load_str(BASE).expect("valid");
        let vocab = snap.vocabulary();
        let chunked = compile_pat_file(Path::new("t.yaml"), &big, &vocab).expect("chunked");
        let whole: PatFileSpec = serde_yaml::from_str(&big).expect("whole");
        assert_eq!(chunked.len(), whole.tokens.len());
        for (c, w) in chunked.iter().zip(&whole.tokens) {
            match (c, w.compile(&vocab)) {
                (Ok((h1, r1)), Ok((h2, r2))) => {
                    assert_eq!((h1, &r1.id, &r1.cubes), (&h2, &r2.id, &r2.cubes))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn other_pat_file_shapes_are_not_split() {
        let text = pat_text(50);
        for other in [
            format!("---\n{text}"),
            format!("version: 1\n{text}"),
            text.replace("tokens:", "records:"),
            format!("{text}extra: 1\n"),
            "tokens: [{id: a, sha256: b}]\n".to_string(),
            text.replace("  - id: tok_7\n", " - id: tok_7\n"),
        ] {
            assert!(split_pat_list(&other, 10).is_none(), "{other:.80}");
        }
        // Fewer items than two chunks: not split; exactly two chunks' worth is.
        assert!(split_pat_list(&pat_text(3), 2).is_none());
        assert_eq!(split_pat_list(&pat_text(4), 2).map(|c| c.len()), Some(2));
        assert!(split_pat_list(&pat_text(19), 10).is_none());
        assert_eq!(split_pat_list(&pat_text(20), 10).map(|c| c.len()), Some(2));
        // The key indented (a valid file; the split wants it at column 0).
        let indented: String = text
            .split_inclusive('\n')
            .map(|l| format!("  {l}"))
            .collect();
        assert!(serde_yaml::from_str::<PatFileSpec>(&indented).is_ok());
        assert!(split_pat_list(&indented, 10).is_none());
        // A list at column 0 is split; with another key after it, not.
        let flush = text.replace("\n  ", "\n");
        assert!(split_pat_list(&flush, 10).is_some());
        assert!(split_pat_list(&format!("{flush}extra: 1\n"), 10).is_none());
    }

    /// An item whose dash stands alone on its line is still an item.
    #[test]
    fn items_with_a_bare_dash_are_split_like_any_other() {
        let text = pat_text(50).replace("  - id: tok_", "  -\n    id: tok_");
        let chunks = split_pat_list(&text, 10).expect("split");
        assert_eq!(chunks.len(), 5);
        let whole: PatFileSpec = serde_yaml::from_str(&text).expect("whole");
        let ids = |records: Vec<PatRecordSpec>| -> Vec<String> {
            records.into_iter().map(|t| t.id).collect()
        };
        assert_eq!(ids(parse_chunks(&chunks)), ids(whole.tokens));
    }

    #[test]
    fn an_anchor_defined_twice_resolves_as_in_the_whole_file() {
        // The case tests/properties `pat_files` found: `*a` follows the
        // second `&a` in its chunk of two, but serde_yaml on the whole file
        // takes the last `&a`.
        let zero = "0".repeat(64);
        let item = |id: &str, cube: &str| {
            format!("- id: {id}\n  sha256: {zero}\n  cube: {{ methods: [GET]{cube} }}\n")
        };
        let text = format!(
            "tokens:\n{}{}{}{}{}",
            item("&a t0", ""),
            item("t1", ", tags: [markers]"),
            item("&a t2", ""),
            item("*a", ""),
            item("&a t6", ""),
        );
        assert!(split_pat_list(&text, 2).is_none());
        let snap = load_str(BASE).expect("valid");
        let (chunked, whole) = pat_file_both_ways(&text, 2, &snap.vocabulary());
        assert_eq!(chunked, whole);
        assert!(whole.contains("id: \"t6\""), "{whole}");
    }

    #[test]
    fn a_file_with_anchors_or_a_chunk_that_does_not_parse_loads_whole() {
        // An alias in a late item refers to an anchor in the first: chunks
        // could not resolve it, so a file with anchors is never split.
        let mut text = pat_text(40).replacen(
            "cube: { methods: [GET], tags: [analytics] }",
            "cube: &c { methods: [GET], tags: [analytics] }",
            1,
        );
        text.push_str(&format!(
            "  - id: tok_last\n    sha256: {:064x}\n    cube: *c\n",
            999
        ));
        assert!(split_pat_list(&text, 10).is_none());
        let snap = load_str(BASE).expect("valid");
        let vocab = snap.vocabulary();
        let compiled =
            compile_pat_file(Path::new("t.yaml"), &text, &vocab).expect("whole-file parse");
        assert_eq!(compiled.len(), 41);
        match (&compiled[40], &compiled[0]) {
            (Ok((_, last)), Ok((_, first))) => assert_eq!(last.cubes, first.cubes),
            other => panic!("{other:?}"),
        }
        // A chunk that does not parse sends the file to the whole-file
        // parser, whose error names its line in the whole file.
        let broken = pat_text(40).replace("  - id: tok_30\n", "  - id: tok_30\n    sha256: [\n");
        assert!(split_pat_list(&broken, 10).is_some());
        match compile_pat_file(Path::new("t.yaml"), &broken, &vocab) {
            Err(ConfigError::Parse { line: Some(l), .. }) => assert!(l > 100, "line {l}"),
            other => panic!("expected a located parse error, got {other:?}"),
        }
    }

    #[test]
    fn json_pat_files_take_the_fast_path() {
        let snap = load_str(BASE).expect("valid");
        let vocab = snap.vocabulary();
        let json = format!(
            r#"{{"tokens": [{{"id": "a", "sha256": "{:064x}", "cube": {{"methods": ["GET"]}}}}]}}"#,
            7
        );
        let compiled = compile_pat_file(Path::new("t.json"), &json, &vocab).expect("json");
        assert!(matches!(&compiled[0], Ok((_, r)) if &*r.id == "a"));
        let bad = r#"{"tokens": [{"id": "a", "sha256": "00", "cubez": {}}]}"#;
        assert!(matches!(
            compile_pat_file(Path::new("t.json"), bad, &vocab),
            Err(ConfigError::Parse { line: Some(1), .. })
        ));
    }

    #[test]
    fn a_key_whose_type_does_not_fit_its_alg_is_refused() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let with_key = |alg: &str, file: &str| {
            format!(
                "{BASE}tokens:\n  jwt:\n    keys:\n      - {{ kid: k, alg: {alg}, public_key: {} }}\n",
                fixtures.join(file).display()
            )
        };
        let err = |alg: &str, file: &str| match load_str(&with_key(alg, file)) {
            Ok(_) => panic!("{alg} with {file} must be refused"),
            Err(e) => e.to_string(),
        };
        assert!(err("ES256", "es384.pub.pem").contains("needs a P-256 key"));
        assert!(err("ES384", "es256.pub.pem").contains("needs a P-384 key"));
        assert!(err("ES256", "rs256.pub.pem").contains("not an EC public key"));
        assert!(err("RS256", "es256.pub.pem").contains("not an RSA public key"));
        assert!(err("EdDSA", "es256.pub.pem").contains("not an Ed25519 public key"));
        assert!(err("HS256", "es256.pub.pem").contains("needs `secret_env`"));
        assert!(err("ES256", "missing.pem").contains("cannot read"));
        for (alg, file) in [
            ("ES256", "es256.pub.pem"),
            ("ES384", "es384.pub.pem"),
            ("RS256", "rs256.pub.pem"),
            ("PS256", "rs256.pub.pem"),
            ("EdDSA", "ed25519.pub.pem"),
        ] {
            let s = load_str(&with_key(alg, file)).unwrap_or_else(|e| panic!("{alg}: {e}"));
            assert_eq!(s.jwt.keys.len(), 1);
        }
    }

    #[test]
    fn route_without_tenant_or_account_warns() {
        let s = load_str(&BASE.replace(
            "  - { path: /v1/health, public: true }",
            "  - { path: /v1/health, public: true }\n  - { path: /v1/me, tag: accounts }",
        ))
        .expect("valid");
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("/v1/me"));
    }
}
