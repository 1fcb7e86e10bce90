//! Test harness: a real hyper upstream on 127.0.0.1:0 that records what it
//! receives, the gateway loaded from real files in a temp dir and served on
//! 127.0.0.1:0, real signed JWTs, real PATs, and a raw-socket HTTP/1.1
//! client so that hostile request lines reach the gateway byte for byte.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use scopegate::Gateway;

pub mod h2raw;
pub use scopegate::token::pat;

pub const HS_SECRET: &str = "integration-test-hs256-secret-0123456789";
pub const ISSUER: &str = "https://auth.test.example";
pub const AUDIENCE: &str = "airbrx-api";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A port on 127.0.0.1 that refuses connections and stays ours: the socket
/// is bound but not listening, so the kernel answers a SYN with a reset and
/// no other listener in this process (a gateway's, an upstream's) can be
/// given the port while the socket lives. Binding a port and dropping it
/// instead once let a gateway in a parallel test take the "closed" port,
/// so a test proxied into that gateway and got its 401. `listen` on the
/// socket later brings an upstream up on the same address.
pub fn refusing_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

// ---------------------------------------------------------------------------
// Upstream

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: http::Version,
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How the upstream behaves.
#[derive(Clone, Default)]
pub struct UpstreamBehaviour {
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// Answer with a streamed body: `first` at once, then `rest` only
    /// after this is notified.
    pub hold: Option<Arc<tokio::sync::Notify>>,
    /// Answer with the request's `x-request-id`, as many services do.
    pub echo_request_id: bool,
}

/// A response body fed from a channel.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Body bytes received so far, across requests, updated per frame.
    pub received: Arc<std::sync::atomic::AtomicUsize>,
    /// TCP connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Upstream {
    pub async fn start(behaviour: UpstreamBehaviour) -> Upstream {
        let behaviour = Arc::new(behaviour);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let received: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let counter = received.clone();
        let log = seen.clone();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let accepted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let log = log.clone();
                let counter = counter.clone();
                let behaviour = behaviour.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            let counter = counter.clone();
                            let behaviour = behaviour.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                // Count the body as it streams; never hold it.
                                let mut body = body;
                                let mut body_len = 0usize;
                                while let Some(frame) = body.frame().await {
                                    match frame {
                                        Ok(f) => {
                                            let n = f.data_ref().map(|d| d.len()).unwrap_or(0);
                                            body_len += n;
                                            counter
                                                .fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                                        }
                                        Err(_) => break,
                                    }
                                }
                                let record = Seen {
                                    version: parts.version,
                                    method: parts.method.to_string(),
                                    path_and_query: parts
                                        .uri
                                        .path_and_query()
                                        .map(|p| p.to_string())
                                        .unwrap_or_default(),
                                    headers: parts
                                        .headers
                                        .iter()
                                        .map(|(k, v)| {
                                            (
                                                k.to_string(),
                                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                            )
                                        })
                                        .collect(),
                                    body_len,
                                };
                                log.lock().expect("lock").push(record);
                                if let Some(d) = behaviour.delay {
                                    tokio::time::sleep(d).await;
                                }
                                let body = json!({"ok": true, "path": parts.uri.path(), "body_len": body_len});
                                let body = match &behaviour.hold {
                                    None => http_body_util::Either::Left(Full::new(Bytes::from(
                                        body.to_string(),
                                    ))),
                                    Some(release) => {
                                        let (tx, rx) = tokio::sync::mpsc::channel(2);
                                        let release = release.clone();
                                        tokio::spawn(async move {
                                            let _ = tx.send(Bytes::from_static(b"first;")).await;
                                            release.notified().await;
                                            let _ = tx.send(Bytes::from_static(b"rest")).await;
                                        });
                                        http_body_util::Either::Right(ChannelBody(rx))
                                    }
                                };
                                let mut resp = http::Response::new(body);
                                resp.headers_mut().insert(
                                    "content-type",
                                    http::HeaderValue::from_static("application/json"),
                                );
                                if behaviour.echo_request_id
                                    && let Some(id) = parts.headers.get("x-request-id")
                                {
                                    resp.headers_mut().insert("x-request-id", id.clone());
                                }
                                // A hop-by-hop header the gateway must strip on the way back.
                                resp.headers_mut().insert(
                                    "keep-alive",
                                    http::HeaderValue::from_static("timeout=5"),
                                );
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            seen,
            received,
            connections,
        }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().expect("lock").last().cloned()
    }
}

// ---------------------------------------------------------------------------
// Gateway

/// The YAML body shared by most tests; `{UPSTREAM}` is replaced.
pub const CONFIG: &str = r#"
listen: { addr: "127.0.0.1:0" }
upstream:
  url: "http://{UPSTREAM}"
  connect_timeout: 1s
  timeout: {TIMEOUT}
mode: {MODE}
tokens:
  pat_file: tokens.yaml
  jwt:
    issuer: https://auth.test.example
    audience: airbrx-api
    leeway: 30s
    keys:
      - { kid: es-test, alg: ES256, public_key: es256.pub.pem }
      - { kid: hs-test, alg: HS256, secret_env: SG_TEST_HS256 }
      - { kid: rs-test, alg: RS256, public_key: rs256.pub.pem }
      - { kid: ed-test, alg: EdDSA, public_key: ed25519.pub.pem }
plans:
  free:
    - { tags: [analytics, markers, tenants, accounts, team], methods: [GET] }
    - { tags: [markers], methods: [POST] }
  pro:
    - { tags: ["*"], methods: ["*"] }
accounts:
  acme:   { plan: pro }
  globex: { plan: free }
  initech: { plan: pro }
tenants:
  acme-prod:    { account: acme }
  acme-staging: { account: acme }
  acme-trial:   { account: acme, plan: free }
  globex-web:   { account: globex }
  initech-eu:   { account: initech }
routes:
  - { path: /v1/health, public: true }
  - { path: "/v1/tenants/{tenant}/analytics/{*rest}", tag: analytics, methods: [GET] }
  - { path: "/v1/tenants/{tenant}/rules", tag: rules, methods: [GET, POST] }
  - { path: "/v1/tenants/{tenant}/rules/{rule_id}", tag: rules, methods: [GET, PUT, DELETE] }
  - { path: "/v1/tenants/{tenant}/markers", tag: markers, methods: [GET, POST] }
  - { path: "/v1/accounts/{account}/tenants", tag: tenants, methods: [GET] }
  - { path: "/v1/accounts/{account}", tag: accounts, methods: [GET, PUT] }
  - { path: "/v1/accounts/{account}/team/{*rest}", tag: team }
  - { path: "/v1/accounts/{account}/tenants/{tenant}/settings", tag: tenants, methods: [GET] }
  - { path: /v1/platform/status, tag: accounts, methods: [GET] }
"#;

/// A PAT record to write into tokens.yaml, with its secret.
pub struct Pat {
    pub secret: String,
    pub yaml: String,
}

/// Mint a PAT and its record. `extra` is more YAML keys for the record
/// (e.g. `disabled: true`), `cube` the flow-style cube.
pub fn pat_record(id: &str, cube: &str, extra: &str) -> Pat {
    let secret = pat::mint().expect("random");
    let sha = hex::encode(pat::hash(&secret));
    let mut yaml = format!("  - id: {id}\n    sha256: {sha}\n    cube: {cube}\n");
    if !extra.is_empty() {
        for line in extra.lines() {
            yaml.push_str(&format!("    {line}\n"));
        }
    }
    Pat { secret, yaml }
}

/// The environment the test configurations read.
pub fn test_env(name: &str) -> Option<String> {
    match name {
        "SG_TEST_HS256" => Some(HS_SECRET.to_string()),
        "SG_TEST_CLIENT_ID" => Some(CLIENT_ID.to_string()),
        "SG_TEST_CLIENT_SECRET" => Some(CLIENT_SECRET.to_string()),
        "SG_TEST_WRONG_SECRET" => Some("not-the-client-secret".to_string()),
        _ => None,
    }
}

/// Introspection client credentials the test configurations read.
pub const CLIENT_ID: &str = "scopegate-test";
pub const CLIENT_SECRET: &str = "introspection-client-secret-0123456789";

/// The tokens.yaml text for these records.
pub fn tokens_yaml(pats: &[&Pat]) -> String {
    if pats.is_empty() {
        return "tokens: []\n".into();
    }
    let mut tokens = String::from("tokens:\n");
    for p in pats {
        tokens.push_str(&p.yaml);
    }
    tokens
}

/// The gateway.yaml text for these options.
pub fn config_yaml(upstream: SocketAddr, opts: &Options) -> String {
    let yaml = CONFIG
        .replace("{UPSTREAM}", &upstream.to_string())
        .replace("{TIMEOUT}", opts.timeout)
        .replace("{MODE}", opts.mode);
    (opts.patch)(yaml)
}

/// Write gateway.yaml, tokens.yaml and the key files into `dir`.
pub fn write_files(dir: &Path, upstream: SocketAddr, pats: &[&Pat], opts: &Options) -> PathBuf {
    for f in ["es256.pub.pem", "rs256.pub.pem", "ed25519.pub.pem"] {
        std::fs::copy(fixture(f), dir.join(f)).expect("copy key");
    }
    std::fs::write(dir.join("tokens.yaml"), tokens_yaml(pats)).expect("write tokens");
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config_yaml(upstream, opts)).expect("write config");
    path
}

/// Replace a file the way editors and config tools do: write a temporary
/// file beside it, then rename it into place.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write tmp");
    std::fs::rename(&tmp, path).expect("rename");
}

pub struct Options {
    pub timeout: &'static str,
    pub mode: &'static str,
    pub patch: Box<dyn Fn(String) -> String + Send>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: "5s",
            mode: "enforce",
            patch: Box::new(|s| s),
        }
    }
}

/// The test configuration with an admin listener on 127.0.0.1:0 too.
pub fn with_admin() -> Options {
    Options {
        patch: Box::new(|s| {
            s.replace(
                "listen: { addr: \"127.0.0.1:0\" }",
                "listen: { addr: \"127.0.0.1:0\" }\nadmin: { addr: \"127.0.0.1:0\" }",
            )
        }),
        ..Default::default()
    }
}

/// A CA and a leaf for `names` it signed: (ca_pem, leaf_pem, leaf_key_pem).
pub fn pki(names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// A rustls server config for a PEM certificate chain and key, offering
/// h2 and http/1.1.
pub fn server_tls(cert_pem: &str, key_pem: &str) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub gw: Arc<Gateway>,
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestGateway {
    /// Write gateway.yaml, tokens.yaml and key files to a temp dir, load
    /// them as `serve` does, and serve on 127.0.0.1:0.
    pub async fn start(upstream: SocketAddr, pats: &[&Pat], opts: Options) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_files(dir.path(), upstream, pats, &opts);
        TestGateway::serve_from(path, dir).await
    }

    /// Load the configuration at `path` and serve it on 127.0.0.1:0.
    pub async fn serve_from(path: PathBuf, dir: tempfile::TempDir) -> TestGateway {
        let snap = match scopegate::config::load(&path, &test_env) {
            Ok(s) => s,
            Err(e) => panic!("test config invalid:\n{e}"),
        };
        let gw = Gateway::new(snap).expect("gateway");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(scopegate::serve(listener, gw.clone(), async move {
            let _ = rx.await;
        }));
        TestGateway {
            addr,
            gw,
            dir,
            path,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Start watching the configuration files, as `serve` does. The
    /// returned sender forces a reload (what SIGHUP does).
    pub fn watch(&self) -> tokio::sync::mpsc::Sender<()> {
        scopegate::reload::spawn(
            self.gw.clone(),
            self.path.clone(),
            std::sync::Arc::new(test_env),
        )
    }

    /// The serving generation number.
    pub fn generation(&self) -> u64 {
        self.gw.current().number
    }

    /// Force a reload with the sender [`TestGateway::watch`] returned (what
    /// SIGHUP does) and wait until a newer generation serves.
    pub async fn reload_now(&self, force: &tokio::sync::mpsc::Sender<()>) {
        let before = self.generation();
        force.send(()).await.expect("send");
        eventually(Duration::from_secs(3), "a new generation", async || {
            self.generation() > before
        })
        .await;
    }

    /// Ask the gateway to stop (graceful drain).
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------
// JWTs

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Standard claims valid for an hour, merged with `extra`.
pub fn claims(extra: Value) -> Value {
    let mut base = json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "jti": "jwt-1",
        "iat": now(),
        "exp": now() + 3600,
    });
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            if v.is_null() {
                b.remove(k);
            } else {
                b.insert(k.clone(), v.clone());
            }
        }
    }
    base
}

pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::ES256 => {
            EncodingKey::from_ec_pem(&std::fs::read(fixture("es256.key.pem")).expect("key"))
                .expect("es key")
        }
        Algorithm::RS256 | Algorithm::PS256 => {
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256.key.pem")).expect("key"))
                .expect("rsa key")
        }
        Algorithm::EdDSA => {
            EncodingKey::from_ed_pem(&std::fs::read(fixture("ed25519.key.pem")).expect("key"))
                .expect("ed key")
        }
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(HS_SECRET.as_bytes())
        }
        other => panic!("no test key for {other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

pub fn es256(cube: Value) -> String {
    sign(
        Algorithm::ES256,
        Some("es-test"),
        &claims(json!({ "cube": cube })),
    )
}

/// `GET` on the `markers` tag of acme-prod (account acme): the cube most
/// tests grant.
pub fn markers_cube() -> Value {
    json!({"methods": ["GET"], "tags": ["markers"], "tenants": ["acme-prod"], "accounts": ["acme"]})
}

/// An ES256 JWT for [`markers_cube`]: the token most tests send.
pub fn markers_jwt() -> String {
    es256(markers_cube())
}

pub fn hs256(cube: Value) -> String {
    sign(
        Algorithm::HS256,
        Some("hs-test"),
        &claims(json!({ "cube": cube })),
    )
}

/// Base64url without padding, for hand-built tokens.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 client

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, Vec<String>>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(|s| s.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn reason(&self) -> String {
        self.json()["reason"].as_str().unwrap_or("").to_string()
    }
}

/// Send raw bytes, read until the server closes, parse one response.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Option<Resp> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Option<Resp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers
            .entry(k.trim().to_ascii_lowercase())
            .or_default()
            .push(v.trim().to_string());
    }
    let mut body = buf[end + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.iter().any(|x| x.contains("chunked")))
    {
        body = dechunk(&body);
    }
    Some(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..nl])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let Some(size) = size.filter(|&n| n > 0) else {
            break;
        };
        let Some(chunk) = b.get(nl + 2..nl + 2 + size) else {
            break;
        };
        out.extend_from_slice(chunk);
        b = b.get(nl + 2 + size + 2..).unwrap_or_default();
    }
    out
}

/// A request with the given method, target and extra header lines.
pub async fn send(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Resp {
    send_body(addr, method, target, headers, b"").await
}

pub async fn send_body(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    // Kept alive, as real clients send it, so the listener's own HTTP/1
    // loop (src/server/fast.rs) reads what it serves in production; with
    // `connection: close` every request went to hyper's server. The
    // answer is read by its framing, then the connection dropped.
    let mut req = format!("{method} {target} HTTP/1.1\r\nhost: gateway.test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    match one_answer(addr, &bytes, method == "HEAD").await {
        Some(r) => r,
        None => panic!("no parsable response to {method} {target}"),
    }
}

/// Whether this run serves HTTP/1 with hyper's server alone
/// (`SCOPEGATE_HTTP1_SERVER=hyper`, CI's second pass), not the own loop.
pub fn hyper_server_alone() -> bool {
    std::env::var("SCOPEGATE_HTTP1_SERVER").as_deref() == Ok("hyper")
}

/// Whether this run sends every upstream request through hyper's client
/// (`SCOPEGATE_UPSTREAM_CLIENT=hyper`, CI's third pass), not the
/// in-future one.
pub fn hyper_client_alone() -> bool {
    std::env::var("SCOPEGATE_UPSTREAM_CLIENT").as_deref() == Ok("hyper")
}

/// Send one request on a new connection and read its answer by the
/// answer's own framing (RFC 9112 §6.3), without waiting for a close.
pub async fn one_answer(addr: SocketAddr, request: &[u8], head_request: bool) -> Option<Resp> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if answer_complete(&buf, head_request) {
            break;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    parse_response(&buf)
}

/// Whether `got` is one answer framed by `content-length`, whole and with
/// nothing after it (stricter than [`answer_complete`], which allows more).
pub fn whole_answer(got: &[u8]) -> bool {
    parse_response(got).is_some_and(|r| {
        r.header("content-length")
            .and_then(|l| l.parse::<usize>().ok())
            == Some(r.body.len())
    })
}

/// Whether `buf` holds a whole final answer. An answer framed by the
/// close only is complete when the server closes.
fn answer_complete(buf: &[u8], head_request: bool) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return true;
    }
    let body = &buf[end + 4..];
    let field = |name: &str| {
        head.split("\r\n")
            .skip(1)
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    if field("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        // Walk the chunks to the last one and the end of the trailers.
        let mut at = 0;
        loop {
            let Some(nl) = body[at..].windows(2).position(|w| w == b"\r\n") else {
                return false;
            };
            let line = String::from_utf8_lossy(&body[at..at + nl]).into_owned();
            let size = line
                .split(';')
                .next()
                .and_then(|x| usize::from_str_radix(x.trim(), 16).ok());
            let Some(size) = size else {
                return true; // malformed: nothing more will make it whole
            };
            at += nl + 2;
            if size == 0 {
                // No trailers, or trailers up to an empty line.
                return body[at..].starts_with(b"\r\n")
                    || body[at..].windows(4).any(|w| w == b"\r\n\r\n");
            }
            if body.len() < at + size + 2 {
                return false;
            }
            at += size + 2;
        }
    }
    if let Some(n) = field("content-length:").and_then(|v| v.parse::<usize>().ok()) {
        return body.len() >= n;
    }
    false
}

/// GET with a bearer token.
pub async fn get(addr: SocketAddr, target: &str, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    send(addr, "GET", target, &[("authorization", &auth)]).await
}

pub async fn call(addr: SocketAddr, method: &str, target: &str, token: &str) -> Resp {
    let auth = format!("Bearer {token}");
    send(addr, method, target, &[("authorization", &auth)]).await
}

/// The value of one series in the gateway's metrics text, e.g.
/// `scopegate_config_reloads_total{result="failure"}`.
pub fn metric(gw: &Gateway, series: &str) -> f64 {
    let text = String::from_utf8(gw.render_metrics()).expect("utf8");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Poll `cond` every 20 ms until it holds or `within` passes; returns how
/// long it took, or panics with `what`.
pub async fn eventually(
    within: Duration,
    what: &str,
    mut cond: impl AsyncFnMut() -> bool,
) -> Duration {
    let started = std::time::Instant::now();
    loop {
        if cond().await {
            return started.elapsed();
        }
        if started.elapsed() > within {
            panic!("not within {within:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// The real binary

pub const BIN: &str = env!("CARGO_BIN_EXE_scopegate");

/// A child process that is killed and reaped when dropped, so a test that
/// fails (panics) before it stops its `scopegate serve` does not leave the
/// process running behind it. Derefs to the [`std::process::Child`].
pub struct ChildGuard(std::process::Child);

impl ChildGuard {
    pub fn new(child: std::process::Child) -> Self {
        ChildGuard(child)
    }
}

impl std::ops::Deref for ChildGuard {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // After a successful wait() std neither signals nor waits again,
        // so a reused process id is never touched.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `scopegate serve` child: the process, its stdout lines, the gateway's
/// address and the admin address, if any.
pub type Serving = (
    ChildGuard,
    std::sync::mpsc::Receiver<String>,
    std::net::SocketAddr,
    Option<std::net::SocketAddr>,
);

/// `scopegate serve --config cfg`, with its stdout lines and the proxy's
/// (and, when configured, the admin's) bound address.
pub fn spawn_serve(cfg: &std::path::Path, log: &mut Vec<String>) -> Serving {
    spawn_serve_with(cfg, log, &[])
}

/// [`spawn_serve`] with extra environment variables.
pub fn spawn_serve_with(
    cfg: &std::path::Path,
    log: &mut Vec<String>,
    env: &[(&str, &str)],
) -> Serving {
    spawn_serve_by(std::process::Command::new(BIN), cfg, log, env)
}

/// [`spawn_serve`] with at most `nofile` open files (`ulimit -n`, set by
/// `sh` before it becomes the gateway).
pub fn spawn_serve_limited(cfg: &std::path::Path, log: &mut Vec<String>, nofile: u32) -> Serving {
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", "ulimit -n \"$0\" && exec \"$@\""])
        .arg(nofile.to_string())
        .arg(BIN);
    spawn_serve_by(sh, cfg, log, &[])
}

/// `cmd serve --config CFG` with `env`: the gateway's address (and the
/// admin address, if any) from its start lines.
fn spawn_serve_by(
    mut cmd: std::process::Command,
    cfg: &std::path::Path,
    log: &mut Vec<String>,
    env: &[(&str, &str)],
) -> Serving {
    let mut child = cmd
        .args(["serve", "--config", cfg.to_str().expect("utf8")])
        .envs(env.iter().copied())
        .env("SG_TEST_HS256", HS_SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(ChildGuard::new)
        .expect("spawn serve");
    let rx = line_reader(child.stdout.take().expect("stdout"));
    let addr_of = |v: &serde_json::Value| -> std::net::SocketAddr {
        v["addr"]
            .as_str()
            .expect("addr")
            .parse()
            .expect("socket addr")
    };
    let mut admin = None;
    let gw = loop {
        let v = wait_for(&rx, log, |v| {
            v["message"] == "admin listening" || v["message"] == "gateway listening"
        });
        if v["message"] == "admin listening" {
            admin = Some(addr_of(&v));
        } else {
            break addr_of(&v);
        }
    };
    (child, rx, gw, admin)
}

/// Stop a `scopegate serve` the way an orchestrator does (SIGTERM: drain,
/// write out the queued log lines, exit) and wait for it; its exit code.
/// Tests that read the log afterwards need this rather than a SIGKILL, which
/// loses the lines still queued to stdout (src/logging.rs).
pub async fn terminate(mut child: ChildGuard) -> Option<i32> {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait")
        .code()
}

/// Lines of a child's stdout, read on a thread.
pub fn line_reader(
    stdout: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn wait_for(
    rx: &std::sync::mpsc::Receiver<String>,
    all: &mut Vec<String>,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no matching log line; saw:\n{}", all.join("\n")));
        all.push(line.clone());
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && pred(&v)
        {
            return v;
        }
    }
}

/// GET `path` with a bearer token over a fresh HTTP/1.1 connection, and
/// return the response as soon as its head arrives, its body still
/// streaming (for upstreams that hold the rest of a body).
pub async fn get_streaming(
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> http::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "gateway.test")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("head in time")
        .expect("response")
}

/// One read from `s`, within 5 s, as text: what the other side sent first
/// (a `100 Continue` alone, or an answer).
pub async fn read_once<S>(s: &mut S) -> String
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The admin listener's answer to `GET path`, from its handler: status
/// and body.
pub async fn admin_get(gw: &Gateway, path: &str) -> (u16, Bytes) {
    let req = http::Request::get(path).body(()).expect("req");
    let r = scopegate::admin::handle(gw, &req);
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}
