//! Token sources at fleet scale (issue 7): a JWKS over HTTPS with rotation,
//! refetch on an unknown `kid` and outages; RFC 7662 introspection for PATs
//! that are not in the PAT file. The key server and the introspection
//! endpoint are real hyper + rustls servers on 127.0.0.1:0 with a CA
//! generated per test, which the gateway trusts through `ca:`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// A real HTTPS token server

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Up,
    /// Every request gets a 500.
    Failing,
    /// Connections are accepted and closed at once.
    Dropping,
}

#[derive(Default)]
struct ServerState {
    jwks: String,
    /// Introspection answers by token; any other token is inactive.
    answers: HashMap<String, Value>,
    /// Authorization headers the introspection endpoint saw.
    seen_auth: Vec<String>,
}

struct TokenServer {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<Mutex<ServerState>>,
    mode: Arc<Mutex<Mode>>,
    jwks_hits: Arc<AtomicUsize>,
    introspect_hits: Arc<AtomicUsize>,
    /// Added before every JWKS answer, so concurrent requests overlap.
    delay: Arc<Mutex<Duration>>,
}

impl TokenServer {
    async fn start(mode: Mode) -> TokenServer {
        let (ca_pem, cert, key) = pki(&["127.0.0.1"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(&cert, &key));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = TokenServer {
            addr,
            ca_pem,
            state: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
            jwks_hits: Arc::default(),
            introspect_hits: Arc::default(),
            delay: Arc::default(),
        };
        let (state, mode, jwks_hits, introspect_hits, delay) = (
            server.state.clone(),
            server.mode.clone(),
            server.jwks_hits.clone(),
            server.introspect_hits.clone(),
            server.delay.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                if *mode.lock().expect("lock") == Mode::Dropping {
                    drop(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let (state, mode, jwks_hits, introspect_hits, delay) = (
                    state.clone(),
                    mode.clone(),
                    jwks_hits.clone(),
                    introspect_hits.clone(),
                    delay.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (state, mode, jwks_hits, introspect_hits, delay) = (
                                state.clone(),
                                mode.clone(),
                                jwks_hits.clone(),
                                introspect_hits.clone(),
                                delay.clone(),
                            );
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let m = *mode.lock().expect("lock");
                                if m == Mode::Dropping {
                                    // Abort the connection (also a pooled one).
                                    return Err(std::io::Error::other("dropping"));
                                }
                                let (status, text) = match parts.uri.path() {
                                    "/jwks.json" => {
                                        jwks_hits.fetch_add(1, Ordering::SeqCst);
                                        let d = *delay.lock().expect("lock");
                                        tokio::time::sleep(d).await;
                                        (200, state.lock().expect("lock").jwks.clone())
                                    }
                                    "/introspect" => {
                                        introspect_hits.fetch_add(1, Ordering::SeqCst);
                                        let d = *delay.lock().expect("lock");
                                        tokio::time::sleep(d).await;
                                        let mut st = state.lock().expect("lock");
                                        let auth = parts
                                            .headers
                                            .get("authorization")
                                            .and_then(|v| v.to_str().ok())
                                            .unwrap_or("")
                                            .to_string();
                                        st.seen_auth.push(auth.clone());
                                        let form = String::from_utf8_lossy(&body).into_owned();
                                        let token = form
                                            .split('&')
                                            .find_map(|kv| kv.strip_prefix("token="))
                                            .unwrap_or("")
                                            .to_string();
                                        if !basic_ok(&auth) {
                                            (401, "{\"error\":\"invalid_client\"}".to_string())
                                        } else {
                                            let answer = st
                                                .answers
                                                .get(&token)
                                                .cloned()
                                                .unwrap_or(json!({"active": false}));
                                            (200, answer.to_string())
                                        }
                                    }
                                    _ => (404, String::new()),
                                };
                                let status = if m == Mode::Failing { 500 } else { status };
                                let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                                *resp.status_mut() =
                                    http::StatusCode::from_u16(status).expect("status");
                                Ok::<_, std::io::Error>(resp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        server
    }

    fn set_mode(&self, m: Mode) {
        *self.mode.lock().expect("lock") = m;
    }

    fn publish(&self, keys: &[&SigningKey]) {
        self.state.lock().expect("lock").jwks = jwks_doc(keys);
    }

    fn answer(&self, token: &str, answer: Value) {
        self.state
            .lock()
            .expect("lock")
            .answers
            .insert(token.to_string(), answer);
    }

    fn jwks(&self) -> usize {
        self.jwks_hits.load(Ordering::SeqCst)
    }

    fn introspections(&self) -> usize {
        self.introspect_hits.load(Ordering::SeqCst)
    }
}

fn basic_ok(auth: &str) -> bool {
    use base64::Engine;
    let want =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    auth == format!("Basic {want}")
}

/// An ES256 key pair and its public JWK.
struct SigningKey {
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

fn signing_key(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let point = pair.public_key_raw();
    SigningKey {
        kid: kid.to_string(),
        key: EncodingKey::from_ec_der(&pair.serialize_der()),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }),
    }
}

fn jwt_with(k: &SigningKey, jti: &str) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(k.kid.clone());
    let c = claims(json!({
        "jti": jti,
        "cube": markers_cube()
    }));
    jsonwebtoken::encode(&h, &c, &k.key).expect("sign")
}

const PATH: &str = "/v1/tenants/acme-prod/markers";

/// The test configuration with a JWKS and/or introspection pointing at
/// `server`, its CA written beside it.
/// The JWK Set of `keys`.
fn jwks_doc(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

async fn gateway(
    up: SocketAddr,
    server: &TokenServer,
    jwks: Option<&'static str>,
    introspection: Option<&'static str>,
    pats: &[&Pat],
) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), &server.ca_pem).expect("ca");
    let addr = server.addr;
    let opts = Options {
        patch: Box::new(move |s| {
            let mut s = s;
            if let Some(extra) = jwks {
                s = s.replace(
                    "    leeway: 30s\n",
                    &format!(
                        "    leeway: 30s\n    jwks: {{ url: \"https://{addr}/jwks.json\", ca: ca.pem, {extra} }}\n"
                    ),
                );
            }
            if let Some(extra) = introspection {
                let secret = if extra.contains("client_secret_env") {
                    ""
                } else {
                    "    client_secret_env: SG_TEST_CLIENT_SECRET\n"
                };
                s = s.replace(
                    "  pat_file: tokens.yaml\n",
                    &format!(
                        "  pat_file: tokens.yaml\n  introspection:\n    url: \"https://{addr}/introspect\"\n    client_id_env: SG_TEST_CLIENT_ID\n{secret}    ca: ca.pem\n    {extra}\n"
                    ),
                );
            }
            s
        }),
        ..Default::default()
    };
    let path = write_files(dir.path(), up, pats, &opts);
    TestGateway::serve_from(path, dir).await
}

// ---------------------------------------------------------------------------
// JWKS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_key_rotation_mid_traffic_fails_no_request() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let (a, b) = (signing_key("2026-11-a"), signing_key("2026-11-b"));
    server.publish(&[&a]);
    // A long refresh: the rotation is picked up by the unknown-kid refetch.
    let gw = gateway(
        up.addr,
        &server,
        Some("refresh: 1h, min_refetch: 100ms"),
        None,
        &[],
    )
    .await;
    // Kept whole: ES256 signatures are randomised, so signing the same
    // claims again would give a token the cache has never seen.
    let first = jwt_with(&a, "a-1");
    let current = Arc::new(Mutex::new(first.clone()));

    // Four clients, each sending the token of the current key in a loop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (current, stop, addr) = (current.clone(), stop.clone(), gw.addr);
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let tok = current.lock().expect("lock").clone();
                let r = get(addr, PATH, &tok).await;
                if r.status == 200 {
                    ok += 1;
                } else {
                    failed.push((r.status, r.reason()));
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The issuer publishes the new key beside the old one, then signs with it.
    server.publish(&[&a, &b]);
    *current.lock().expect("lock") = jwt_with(&b, "b-1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Later the old key is retired from the set.
    server.publish(&[&b]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.await.expect("client");
        assert!(
            failed.is_empty(),
            "requests failed during rotation: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 20, "only {total} requests ran");

    // A token of the retired key stops working once the set is fetched
    // again, even though it verified (and was cached) before.
    let r = get(gw.addr, PATH, &jwt_with(&b, "b-2")).await;
    assert_eq!(r.status, 200);
    // Force a fetch that sees the retired set: an unknown kid triggers it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _ = get(gw.addr, PATH, &jwt_with(&signing_key("nobody"), "x")).await;
    let r = get(gw.addr, PATH, &first).await;
    assert_eq!((r.status, r.reason().as_str()), (401, "unknown_key"));
    assert!(metric(&gw.gw, "scopegate_jwks_fetches_total{result=\"ok\"}") >= 2.0);
    assert_eq!(metric(&gw.gw, "scopegate_jwks_keys"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_is_fetched_once_under_100_concurrent_requests() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let (a, c) = (signing_key("k-a"), signing_key("k-c"));
    server.publish(&[&a]);
    let gw = gateway(
        up.addr,
        &server,
        Some("refresh: 1h, min_refetch: 1h"),
        None,
        &[],
    )
    .await;
    assert_eq!(get(gw.addr, PATH, &jwt_with(&a, "a")).await.status, 200);
    let before = server.jwks();
    assert_eq!(before, 1, "one fetch at start");

    // A new key appears; 100 requests carrying it arrive together while the
    // key server takes 300 ms to answer.
    server.publish(&[&a, &c]);
    *server.delay.lock().expect("lock") = Duration::from_millis(300);
    let tok = jwt_with(&c, "c");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (tok, addr) = (tok.clone(), gw.addr);
        tasks.push(tokio::spawn(
            async move { get(addr, PATH, &tok).await.status },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    assert_eq!(server.jwks(), before + 1, "exactly one refetch");

    // Made-up kids are rate-limited: no further fetch, a plain 401.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let addr = gw.addr;
        let tok = jwt_with(&signing_key(&format!("made-up-{i}")), "x");
        tasks.push(tokio::spawn(async move {
            let r = get(addr, PATH, &tok).await;
            (r.status, r.reason())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), (401, "unknown_key".to_string()));
    }
    assert_eq!(server.jwks(), before + 1, "made-up kids caused fetches");
    assert!(
        metric(
            &gw.gw,
            "scopegate_jwks_fetches_total{result=\"rate_limited\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_after_the_first_load_keeps_the_last_good_keys() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let a = signing_key("k-a");
    server.publish(&[&a]);
    let gw = gateway(
        up.addr,
        &server,
        Some("refresh: 200ms, min_refetch: 100ms"),
        None,
        &[],
    )
    .await;
    assert_eq!(get(gw.addr, PATH, &jwt_with(&a, "a")).await.status, 200);

    for (mode, kind) in [(Mode::Failing, "status"), (Mode::Dropping, "connect")] {
        server.set_mode(mode);
        let series = format!("scopegate_jwks_fetches_total{{result=\"{kind}\"}}");
        eventually(
            Duration::from_secs(5),
            "fetch failures counted",
            async || metric(&gw.gw, &series) >= 2.0,
        )
        .await;
        // Fresh tokens (not cached) of the known key still verify.
        let r = get(gw.addr, PATH, &jwt_with(&a, &format!("during-{kind}"))).await;
        assert_eq!(r.status, 200, "{kind}: {}", r.reason());
    }
    // A garbage document is a failed fetch too, not an empty key set.
    server.set_mode(Mode::Up);
    server.state.lock().expect("lock").jwks =
        "{\"keys\": [{\"kty\": \"oct\", \"k\": \"AAAA\", \"kid\": \"k-a\"}]}".into();
    eventually(
        Duration::from_secs(5),
        "an invalid fetch counted",
        async || metric(&gw.gw, "scopegate_jwks_fetches_total{result=\"invalid\"}") >= 1.0,
    )
    .await;
    assert_eq!(
        get(gw.addr, PATH, &jwt_with(&a, "after-garbage"))
            .await
            .status,
        200
    );
    let status = gw
        .gw
        .current()
        .snapshot
        .jwt
        .jwks
        .as_ref()
        .map(|j| j.status())
        .expect("jwks");
    assert_eq!(status["keys"], json!(["k-a"]));
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no usable key"))
    );
}

/// A key server's answer is read up to 1 MiB, to the byte, and within the
/// fetch timeout: past either it is a failed fetch, counted by kind, and
/// the last good keys keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_too_large_or_too_slow_is_a_failed_fetch() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let (a, b, c) = (signing_key("k-a"), signing_key("k-b"), signing_key("k-c"));
    server.publish(&[&a]);
    let gw = gateway(
        up.addr,
        &server,
        Some("refresh: 200ms, min_refetch: 100ms, timeout: 500ms"),
        None,
        &[],
    )
    .await;
    assert_eq!(get(gw.addr, PATH, &jwt_with(&a, "a")).await.status, 200);
    let padded = |keys: &[&SigningKey], len: usize| {
        let mut doc = jwks_doc(keys);
        assert!(doc.len() < len);
        doc.push_str(&" ".repeat(len - doc.len()));
        doc
    };
    // README: a key set over 1 MiB is a failed fetch.
    let max = 1024 * 1024;
    server.state.lock().expect("lock").jwks = padded(&[&a, &b], max);
    eventually(
        Duration::from_secs(5),
        "a key set of exactly 1 MiB loaded",
        async || get(gw.addr, PATH, &jwt_with(&b, "b")).await.status == 200,
    )
    .await;

    server.state.lock().expect("lock").jwks = padded(&[&a, &b, &c], max + 1);
    eventually(
        Duration::from_secs(5),
        "a key set of 1 MiB + 1 refused",
        async || metric(&gw.gw, "scopegate_jwks_fetches_total{result=\"body\"}") >= 1.0,
    )
    .await;
    assert_ne!(get(gw.addr, PATH, &jwt_with(&c, "c")).await.status, 200);
    assert_eq!(get(gw.addr, PATH, &jwt_with(&b, "b2")).await.status, 200);

    server.publish(&[&a, &b, &c]);
    *server.delay.lock().expect("lock") = Duration::from_millis(1500);
    eventually(
        Duration::from_secs(5),
        "a fetch past its timeout counted",
        async || metric(&gw.gw, "scopegate_jwks_fetches_total{result=\"timeout\"}") >= 1.0,
    )
    .await;
    assert_eq!(get(gw.addr, PATH, &jwt_with(&a, "a2")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_from_the_start_is_503_with_retry_after_then_recovers() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Dropping).await;
    let a = signing_key("k-a");
    server.publish(&[&a]);
    let gw = gateway(
        up.addr,
        &server,
        Some("refresh: 1h, min_refetch: 200ms"),
        None,
        &[],
    )
    .await;
    let r = get(gw.addr, PATH, &jwt_with(&a, "a")).await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (503, "key_source_unavailable"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(r.header("www-authenticate"), None);
    assert_eq!(up.count(), 0);
    // The configured static key works beside the JWKS all along.
    let static_tok = markers_jwt();
    assert_eq!(get(gw.addr, PATH, &static_tok).await.status, 200);
    // So does a token that is not a JWT at all being refused as before.
    assert_eq!(
        get(gw.addr, PATH, "abx_pat_nope").await.reason(),
        "malformed_token"
    );

    // The key server comes up: the next request's refetch (or the
    // background retry) loads the set and the same token passes.
    server.set_mode(Mode::Up);
    let addr = gw.addr;
    let tok = jwt_with(&a, "a");
    let mut passed = false;
    for _ in 0..50 {
        if get(addr, PATH, &tok).await.status == 200 {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(passed, "never recovered after the key server came up");

    // `scopegate explain` consults the JWKS URL as the proxy does.
    let out = std::process::Command::new(BIN)
        .args([
            "explain",
            "--config",
            gw.path.to_str().expect("utf8"),
            "--token",
            &tok,
            "GET",
            PATH,
        ])
        .env("SG_TEST_HS256", HS_SECRET)
        .output()
        .expect("explain");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"allow\""), "{stdout}");
}

#[tokio::test]
async fn jwks_configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = config_yaml("127.0.0.1:9".parse().expect("addr"), &Options::default());
    let cases = [
        (
            "jwks: { url: \"http://idp.example/jwks.json\" }",
            "tokens.jwt.jwks.url",
            "https://",
        ),
        (
            "jwks: { url: \"https://idp.example/j\", file: j.json }",
            "tokens.jwt.jwks",
            "exactly one",
        ),
        (
            "jwks: { file: missing.json }",
            "missing.json",
            "cannot read",
        ),
        (
            "jwks: { file: bad.json }",
            "tokens.jwt.jwks.file",
            "no usable key",
        ),
        (
            "jwks: { url: \"https://idp.example/j\", ca: missing-ca.pem }",
            "missing-ca.pem",
            "cannot read",
        ),
    ];
    std::fs::write(
        dir.path().join("bad.json"),
        r#"{"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}]}"#,
    )
    .expect("write");
    for f in ["es256.pub.pem", "rs256.pub.pem", "ed25519.pub.pem"] {
        std::fs::copy(fixture(f), dir.path().join(f)).expect("copy");
    }
    std::fs::write(dir.path().join("tokens.yaml"), "tokens: []\n").expect("write");
    for (jwks, key, message) in cases {
        let text = base.replace(
            "    leeway: 30s\n",
            &format!("    leeway: 30s\n    {jwks}\n"),
        );
        let err = scopegate::config::from_yaml(&text, &dir.path().join("gateway.yaml"), &test_env)
            .expect_err(jwks)
            .to_string();
        assert!(err.contains(key) && err.contains(message), "{jwks}: {err}");
    }
    let intro = [
        (
            "introspection: { url: \"http://idp.example/i\", client_id_env: SG_TEST_CLIENT_ID, client_secret_env: SG_TEST_CLIENT_SECRET }",
            "tokens.introspection.url",
        ),
        (
            "introspection: { url: \"https://idp.example/i\", client_id_env: SG_TEST_CLIENT_ID, client_secret_env: NOPE }",
            "tokens.introspection.client_secret_env",
        ),
        (
            "introspection: { url: \"https://idp.example/i\", client_id_env: SG_TEST_CLIENT_ID, client_secret_env: SG_TEST_CLIENT_SECRET, cache_size: 0 }",
            "tokens.introspection.cache_size",
        ),
    ];
    for (i, key) in intro {
        let text = base.replace(
            "  pat_file: tokens.yaml\n",
            &format!("  pat_file: tokens.yaml\n  {i}\n"),
        );
        let err = scopegate::config::from_yaml(&text, &dir.path().join("gateway.yaml"), &test_env)
            .expect_err(i)
            .to_string();
        assert!(err.contains(key), "{i}: {err}");
        assert!(!err.contains(CLIENT_SECRET));
    }
}

#[tokio::test]
async fn a_jwks_file_is_a_key_source_too() {
    let up = Upstream::start(Default::default()).await;
    let a = signing_key("file-a");
    let rsa_without_alg = json!({"kty": "RSA", "kid": "r", "n": b64(&[0xc5; 256]), "e": "AQAB"});
    let hmac = json!({"kty": "oct", "kid": "h", "k": b64(b"0123456789abcdef0123456789abcdef")});
    let p384_as_es256 = json!({"kty": "EC", "crv": "P-384", "alg": "ES256", "kid": "mismatch", "x": b64(&[1; 48]), "y": b64(&[2; 48])});
    let doc = json!({"keys": [a.jwk, rsa_without_alg, hmac, p384_as_es256]});
    let opts = Options {
        patch: Box::new(|s| {
            s.replace(
                "    leeway: 30s\n",
                "    leeway: 30s\n    jwks: { file: jwks.json }\n",
            )
        }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("jwks.json"), doc.to_string()).expect("write");
    let path = write_files(dir.path(), up.addr, &[], &opts);
    let gw = TestGateway::serve_from(path, dir).await;
    let token_a = jwt_with(&a, "f");
    assert_eq!(get(gw.addr, PATH, &token_a).await.status, 200);
    // Only the pinned EC key was taken; the others are listed as skipped.
    let status = gw
        .gw
        .current()
        .snapshot
        .jwt
        .jwks
        .as_ref()
        .map(|j| j.status())
        .expect("jwks");
    assert_eq!(status["keys"], json!(["file-a"]));
    assert_eq!(status["skipped"], 3);
    // An HS256 token naming the oct key of the JWKS is not accepted.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("h".into());
    let forged = jsonwebtoken::encode(
        &h,
        &claims(json!({"cube": markers_cube()})),
        &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
    )
    .expect("sign");
    assert_eq!(get(gw.addr, PATH, &forged).await.reason(), "unknown_key");

    // A reload re-reads the file and the running source takes the new set
    // at once: the old key's token, accepted above, stops, and the new key
    // works.
    let b = signing_key("file-b");
    std::fs::write(
        gw.dir.path().join("jwks.json"),
        json!({"keys": [b.jwk]}).to_string(),
    )
    .expect("rewrite");
    let force = gw.watch();
    gw.reload_now(&force).await;
    assert_eq!(get(gw.addr, PATH, &token_a).await.reason(), "unknown_key");
    assert_eq!(get(gw.addr, PATH, &jwt_with(&b, "g")).await.status, 200);
}

// ---------------------------------------------------------------------------
// Introspection

fn active(id: &str, cube: Value, exp: i64) -> Value {
    json!({"active": true, "token_id": id, "sub": "svc-1", "exp": exp, "cube": cube})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_positive_negative_cached_and_expired() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let local = pat_record(
        "tok_local",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let gw = gateway(
        up.addr,
        &server,
        None,
        Some("positive_ttl: 1s\n    negative_ttl: 1s"),
        &[&local],
    )
    .await;

    // A PAT from the local file never reaches the endpoint.
    assert_eq!(get(gw.addr, PATH, &local.secret).await.status, 200);
    assert_eq!(server.introspections(), 0);

    // Positive: the endpoint's identity reaches the upstream.
    let remote = pat::mint().expect("random");
    server.answer(&remote, active("tok_remote", markers_cube(), now() + 3600));
    let r = get(gw.addr, PATH, &remote).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = up.last().expect("seen");
    assert_eq!(seen.header("x-airbrx-token-id"), Some("tok_remote"));
    assert_eq!(server.introspections(), 1);
    // The endpoint got the client credentials and the token, as RFC 7662 says.
    assert!(
        server
            .state
            .lock()
            .expect("lock")
            .seen_auth
            .iter()
            .all(|a| basic_ok(a))
    );
    // Cached: no second call, and the cube is enforced (another tenant: 403).
    assert_eq!(get(gw.addr, PATH, &remote).await.status, 200);
    let r = get(gw.addr, "/v1/tenants/acme-staging/markers", &remote).await;
    assert_eq!((r.status, r.reason().as_str()), (403, "tenant"));
    assert_eq!(server.introspections(), 1);
    assert!(
        metric(
            &gw.gw,
            "scopegate_introspection_cache_total{result=\"hit\"}"
        ) >= 2.0
    );

    // Negative: inactive is a 401 and is cached for negative_ttl.
    let unknown = pat::mint().expect("random");
    for _ in 0..3 {
        let r = get(gw.addr, PATH, &unknown).await;
        assert_eq!((r.status, r.reason().as_str()), (401, "unknown_token"));
    }
    assert_eq!(server.introspections(), 2);
    // A malformed PAT never reaches the endpoint.
    let _ = get(gw.addr, PATH, "abx_pat_0000").await;
    assert_eq!(server.introspections(), 2);

    // After the positive TTL the endpoint is asked again, and its new
    // answer (revoked upstream) wins; after the negative TTL too (issued
    // upstream since).
    server.answer(&remote, json!({"active": false}));
    server.answer(&unknown, active("tok_late", markers_cube(), now() + 3600));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(gw.addr, PATH, &remote).await;
    assert_eq!((r.status, r.reason().as_str()), (401, "unknown_token"));
    assert_eq!(server.introspections(), 3);
    let r = get(gw.addr, PATH, &unknown).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(server.introspections(), 4);

    // The positive TTL is capped by the token's own exp.
    let short = pat::mint().expect("random");
    server.answer(&short, active("tok_short", markers_cube(), now() + 1));
    assert_eq!(get(gw.addr, PATH, &short).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    server.answer(&short, active("tok_short", markers_cube(), now() - 5));
    let r = get(gw.addr, PATH, &short).await;
    assert_eq!((r.status, r.reason().as_str()), (401, "expired"));

    let metrics = String::from_utf8_lossy(&gw.gw.metrics.render()).into_owned();
    assert!(metrics.contains("scopegate_introspection_requests_total{result=\"active\"}"));
    assert!(metrics.contains("scopegate_introspection_requests_total{result=\"inactive\"}"));
    assert!(metrics.contains("scopegate_introspection_duration_seconds_count"));
    for secret in [CLIENT_SECRET, remote.as_str(), short.as_str()] {
        assert!(!metrics.contains(secret));
    }
    // /config shows the source and its cache, never the credentials.
    let (_, body) = admin_get(&gw.gw, "/config").await;
    let config: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        config["token_sources"]["introspection"]["endpoint"],
        format!("https://{}/introspect", server.addr)
    );
    // Cached now: `remote` inactive and `unknown` active. `short`'s entry
    // expired, and its last answer (exp passed) was not cached.
    assert_eq!(
        config["token_sources"]["introspection"]["cached"].as_u64(),
        Some(2)
    );
    let text = String::from_utf8_lossy(&body);
    for secret in [
        CLIENT_SECRET,
        remote.as_str(),
        &hex::encode(pat::hash(&remote)),
    ] {
        assert!(!text.contains(secret), "a secret in /config");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_down_is_503_unless_cached_and_never_a_pass() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let gw = gateway(up.addr, &server, None, Some("positive_ttl: 1h"), &[]).await;
    let cached = pat::mint().expect("random");
    server.answer(&cached, active("tok_cached", markers_cube(), now() + 3600));
    assert_eq!(get(gw.addr, PATH, &cached).await.status, 200);
    let n = up.count();

    for mode in [Mode::Failing, Mode::Dropping] {
        server.set_mode(mode);
        let fresh = pat::mint().expect("random");
        server.answer(&fresh, active("tok_fresh", markers_cube(), now() + 3600));
        let r = get(gw.addr, PATH, &fresh).await;
        assert_eq!(
            (r.status, r.reason().as_str()),
            (503, "token_source_unavailable"),
            "{mode:?}"
        );
        assert_eq!(r.header("retry-after"), Some("5"));
        // A cached answer keeps working through the outage.
        assert_eq!(get(gw.addr, PATH, &cached).await.status, 200, "{mode:?}");
    }
    assert_eq!(up.count(), n + 2, "only the cached token was forwarded");
    assert!(
        metric(
            &gw.gw,
            "scopegate_introspection_requests_total{result=\"status\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &gw.gw,
            "scopegate_introspection_requests_total{result=\"connect\"}"
        ) >= 1.0
    );

    // A new PAT arriving on 50 requests at once costs one call, and so
    // does an inactive one: the waiters share the one answer.
    server.set_mode(Mode::Up);
    *server.delay.lock().expect("lock") = Duration::from_millis(300);
    for (answer, want) in [
        (Some(active("tok_burst", markers_cube(), now() + 3600)), 200),
        (None, 401),
    ] {
        let tok = pat::mint().expect("random");
        if let Some(a) = answer {
            server.answer(&tok, a);
        }
        let before = server.introspections();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (tok, addr) = (tok.clone(), gw.addr);
            tasks.push(tokio::spawn(
                async move { get(addr, PATH, &tok).await.status },
            ));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task"), want);
        }
        assert_eq!(
            server.introspections(),
            before + 1,
            "one call for 50 requests"
        );
    }
    *server.delay.lock().expect("lock") = Duration::ZERO;
    let n = up.count();

    // Wrong client credentials at the endpoint are an outage, not a pass.
    server.set_mode(Mode::Up);
    let wrong = gateway(
        up.addr,
        &server,
        None,
        Some("client_secret_env: SG_TEST_WRONG_SECRET"),
        &[],
    )
    .await;
    let r = get(wrong.addr, PATH, &cached).await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (503, "token_source_unavailable")
    );
    assert_eq!(up.count(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_introspection_answer_is_authorized_against_the_current_config() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let gw = gateway(up.addr, &server, None, Some("positive_ttl: 1h"), &[]).await;
    let _watch = gw.watch();
    let tok = pat::mint().expect("random");
    server.answer(&tok, active("tok_plan", markers_cube(), now() + 3600));
    assert_eq!(get(gw.addr, PATH, &tok).await.status, 200);
    assert_eq!(server.introspections(), 1);

    // The operator moves acme to a plan without markers; the cached answer
    // (identity + cube names) is authorized afresh and refused by the plan.
    let text = std::fs::read_to_string(&gw.path).expect("read");
    let next = text
        .replace("  acme:   { plan: pro }", "  acme:   { plan: nomarkers }")
        .replace(
            "plans:\n",
            "plans:\n  nomarkers:\n    - { tags: [analytics], methods: [GET] }\n",
        );
    assert_ne!(text, next);
    let before = gw.generation();
    write_atomic(&gw.path, &next);
    eventually(Duration::from_secs(5), "the reload", async || {
        gw.generation() > before
    })
    .await;
    let r = get(gw.addr, PATH, &tok).await;
    assert_eq!((r.status, r.reason().as_str()), (403, "plan"));
    // Still from the cache: the reload kept the introspector and its cache.
    assert_eq!(server.introspections(), 1);
}

/// A token with a `kid` the gateway has not loaded, arriving before the
/// source's background task has first run (the usual case at start under
/// load), fetches the set on demand; the background task then finds a set
/// loaded while it waited and does not fetch it a second time. Seen as a
/// flaky `one fetch at start` above: 2 in about one run in ten under
/// nextest. Driven on one thread, so the task cannot run before the
/// request: without the check it fetched twice every time.
#[tokio::test]
async fn a_new_kid_before_the_first_fetch_costs_one_fetch() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let a = signing_key("k-a");
    server.publish(&[&a]);
    let gw = gateway(
        up.addr,
        &server,
        Some("refresh: 1h, min_refetch: 1h"),
        None,
        &[],
    )
    .await;
    // Straight to the gateway, on this task: the source's task, spawned
    // when the gateway was built, has not run yet.
    let req = http::Request::builder()
        .uri(PATH)
        .header("host", "g")
        .header("authorization", format!("Bearer {}", jwt_with(&a, "a")))
        .body(scopegate::proxy::RequestBody::Empty)
        .expect("request");
    let peer = scopegate::proxy::Peer::new(([127, 0, 0, 1], 1).into(), false);
    let resp = gw.gw.handle(req, &peer).await;
    assert_eq!(resp.status(), 200);
    // Let the background task take its turn, then count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.jwks(), 1);
}

/// A request that waits on the introspection endpoint and is then denied
/// gets no `100 Continue`: the own HTTP/1 loop sends it only once the body
/// is wanted, which a denied request's never is (hyper's server does the
/// same), so the client need not send a body that would be dropped. The
/// same request with a token the endpoint allows is told to send it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_denied_after_introspection_is_not_told_to_send_its_body() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let gw = gateway(up.addr, &server, None, Some("positive_ttl: 1s"), &[]).await;
    let allowed = pat::mint().expect("random");
    let cube = json!({"methods": ["POST"], "tags": ["markers"], "tenants": ["acme-prod"], "accounts": ["acme"]});
    server.answer(&allowed, active("tok_post", cube, now() + 3600));
    let unknown = pat::mint().expect("random");
    for (token, allow) in [(&unknown, false), (&allowed, true)] {
        let mut s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {token}\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("write");
        let first = read_once(&mut s).await;
        if allow {
            assert_eq!(first, "HTTP/1.1 100 Continue\r\n\r\n");
            s.write_all(b"hello").await.expect("write");
            let answer = read_once(&mut s).await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        } else {
            assert!(first.starts_with("HTTP/1.1 401 "), "{first}");
        }
    }
    assert_eq!(server.introspections(), 2);
}

/// A reload that leaves `tokens.jwks` as it was keeps the running source,
/// its keys and its refresh task: no second fetch. One that moves it to
/// another server (and CA) starts a new source there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_jwks_source_unless_it_moved() {
    let up = Upstream::start(Default::default()).await;
    let server = TokenServer::start(Mode::Up).await;
    let a = signing_key("keep-a");
    server.publish(&[&a]);
    let gw = gateway(
        up.addr,
        &server,
        Some("refresh: 1h, min_refetch: 100ms"),
        None,
        &[],
    )
    .await;
    let force = gw.watch();
    let source = || gw.gw.current().snapshot.jwt.jwks.clone().expect("jwks");
    assert_eq!(get(gw.addr, PATH, &jwt_with(&a, "a-1")).await.status, 200);
    assert_eq!(server.jwks_hits.load(Ordering::SeqCst), 1);
    let running = source();

    gw.reload_now(&force).await;
    assert!(Arc::ptr_eq(&running, &source()), "the source was replaced");
    assert_eq!(get(gw.addr, PATH, &jwt_with(&a, "a-2")).await.status, 200);
    assert_eq!(server.jwks_hits.load(Ordering::SeqCst), 1, "fetched again");

    // Moved: another server with another CA and key.
    let moved = TokenServer::start(Mode::Up).await;
    let b = signing_key("moved-b");
    moved.publish(&[&b]);
    std::fs::write(gw.dir.path().join("ca.pem"), &moved.ca_pem).expect("ca");
    let text = std::fs::read_to_string(&gw.path).expect("read");
    write_atomic(
        &gw.path,
        &text.replace(&server.addr.to_string(), &moved.addr.to_string()),
    );
    gw.reload_now(&force).await;
    assert!(!Arc::ptr_eq(&running, &source()), "the old source kept");
    assert_eq!(get(gw.addr, PATH, &jwt_with(&b, "b-1")).await.status, 200);
    assert!(moved.jwks_hits.load(Ordering::SeqCst) >= 1);
    let r = get(gw.addr, PATH, &jwt_with(&a, "a-3")).await;
    assert_eq!((r.status, r.reason().as_str()), (401, "unknown_key"));
}
