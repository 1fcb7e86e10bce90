//! TLS: termination with ALPN h2 and http/1.1, certificates reloaded with
//! the generation, and an `https://` upstream trusted through `upstream.ca`.
//! Certificates are generated per test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::HandshakeKind;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("add");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
}

fn tls_opts() -> Options {
    Options {
        patch: Box::new(|s| {
            s.replace(
                "listen: { addr: \"127.0.0.1:0\" }",
                "listen:\n  addr: \"127.0.0.1:0\"\n  tls: { cert: server.crt, key: server.key }",
            )
        }),
        ..Default::default()
    }
}

/// A gateway terminating TLS with `cert` and `key` (PEM) under `opts`, in
/// front of a fresh upstream (returned: it lives as long as the test).
async fn tls_gateway(cert: &str, key: &str, opts: &Options) -> (Upstream, TestGateway) {
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("server.crt"), cert).expect("write");
    std::fs::write(dir.path().join("server.key"), key).expect("write");
    let path = write_files(dir.path(), up.addr, &[], opts);
    (up, TestGateway::serve_from(path, dir).await)
}

/// `GET /v1/health` over HTTP/1.1 on an established TLS connection,
/// answered 200 and read to its end.
async fn health_over(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let req = http::Request::get("/v1/health")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("req");
    let resp = h1.send_request(req).await.expect("resp");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.expect("body");
}

/// Write a new certificate and key where the gateway's are (key first),
/// and wait until new connections get it (`ca` trusts it).
async fn replace_certificate(gw: &TestGateway, ca: &str, cert: &str, key: &str) {
    write_atomic(&gw.dir.path().join("server.key"), key);
    write_atomic(&gw.dir.path().join("server.crt"), cert);
    eventually(
        Duration::from_secs(3),
        "new certificate served",
        async || {
            tls_connect(gw.addr, client_config(ca, &[b"http/1.1"]))
                .await
                .is_ok()
        },
    )
    .await;
}

/// A connection the gateway closes after its answer (`Connection:
/// close`) ends with TLS's close_notify, whether the gateway or the
/// upstream answered: without it a client cannot tell the end of the
/// answer from a cut (rustls reports an unexpected EOF).
#[tokio::test]
async fn a_tls_connection_closed_after_its_answer_ends_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ca, cert, key) = pki(&["localhost"]);
    let (up, gw) = tls_gateway(&cert, &key, &tls_opts()).await;
    let tok = markers_jwt();
    for (path, status) in [
        ("/v1/tenants/acme-prod/markers", "200"),
        ("/v1/tenants/acme-staging/markers", "403"),
    ] {
        let mut tls = tls_connect(gw.addr, client_config(&ca, &[b"http/1.1"]))
            .await
            .expect("tls");
        tls.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {tok}\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got))
            .await
            .expect("closed in time")
            .expect("closed with close_notify");
        let head = String::from_utf8_lossy(&got);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {head}"
        );
    }
    assert_eq!(up.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_over_http1_and_http2_and_certificate_reload() {
    let (ca1, cert1, key1) = pki(&["localhost"]);
    let (up, gw) = tls_gateway(&cert1, &key1, &tls_opts()).await;
    let _watch = gw.watch();
    let tok = markers_jwt();

    // HTTP/2 by ALPN.
    let tls = tls_connect(gw.addr, client_config(&ca1, &[b"h2", b"http/1.1"]))
        .await
        .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2");
    tokio::spawn(conn);
    let req = http::Request::get("https://localhost/v1/tenants/acme-prod/markers")
        .header("authorization", format!("Bearer {tok}"))
        .body(Empty::<Bytes>::new())
        .expect("req");
    assert_eq!(h2.send_request(req).await.expect("resp").status(), 200);
    assert_eq!(
        up.last()
            .and_then(|s| s.header("x-forwarded-proto").map(str::to_string))
            .as_deref(),
        Some("https")
    );

    // HTTP/1.1 by ALPN.
    let tls = tls_connect(gw.addr, client_config(&ca1, &[b"http/1.1"]))
        .await
        .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let req = http::Request::get("/v1/tenants/acme-prod/markers")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {tok}"))
        .body(Empty::<Bytes>::new())
        .expect("req");
    let resp = h1.send_request(req).await.expect("resp");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_11);

    // Plaintext to a TLS listener gets no HTTP answer.
    let r = raw(
        gw.addr,
        b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(r.is_none(), "plaintext was served on the TLS listener");

    // Certificate and key replaced on disk: new connections get the new one.
    let (ca2, cert2, key2) = pki(&["localhost"]);
    replace_certificate(&gw, &ca2, &cert2, &key2).await;
    assert!(
        tls_connect(gw.addr, client_config(&ca1, &[b"http/1.1"]))
            .await
            .is_err(),
        "old certificate still served"
    );
}

/// One TLS connection from `cfg` with one request read to its end (so the
/// session tickets that follow the handshake are taken in): how its
/// handshake went.
async fn visit(addr: std::net::SocketAddr, cfg: Arc<rustls::ClientConfig>) -> HandshakeKind {
    let tls = tls_connect(addr, cfg).await.expect("tls");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    health_over(tls).await;
    kind
}

/// Clients that come back resume their sessions, more of them than
/// rustls's default cache keeps (256 sessions, two a client), also after a
/// reload that left the certificate alone; and none does after a reload
/// changed the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_clients_resume_their_tls_sessions_until_a_reload() {
    let (ca1, cert1, key1) = pki(&["localhost"]);
    let (ca2, cert2, key2) = pki(&["localhost"]);
    let (_up, gw) = tls_gateway(&cert1, &key1, &tls_opts()).await;
    let hup = gw.watch();

    // Each client its own session store, trusting both certificates.
    let both = format!("{ca1}{ca2}");
    let clients: Vec<_> = (0..200)
        .map(|_| client_config(&both, &[b"http/1.1"]))
        .collect();
    for c in &clients {
        assert_eq!(visit(gw.addr, c.clone()).await, HandshakeKind::Full);
    }
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(
            visit(gw.addr, c.clone()).await,
            HandshakeKind::Resumed,
            "client {i} of {} was not resumed",
            clients.len()
        );
    }

    // A reload that leaves certificate and key alone (SIGHUP here; a PAT
    // edit alike) keeps the sessions.
    gw.reload_now(&hup).await;
    for c in clients.iter().take(20) {
        assert_eq!(visit(gw.addr, c.clone()).await, HandshakeKind::Resumed);
    }

    replace_certificate(&gw, &ca2, &cert2, &key2).await;
    for c in clients.iter().take(20) {
        assert_eq!(visit(gw.addr, c.clone()).await, HandshakeKind::Full);
    }
}

/// A TLS handshake counts against `header_read_timeout` as a request head
/// does: a client that connects and never finishes it is cut off (not
/// before the timeout, and soon after it). A client that does finish it
/// has the whole timeout again for its first head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_not_finished_in_header_read_timeout_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ca, cert, key) = pki(&["localhost"]);
    let tls = tls_opts();
    let opts = Options {
        patch: Box::new(move |s| {
            format!(
                "{}limits: {{ header_read_timeout: 300ms, idle_timeout: 30s }}\n",
                (tls.patch)(s)
            )
        }),
        ..Default::default()
    };
    let (_up, gw) = tls_gateway(&cert, &key, &opts).await;

    // Silent after connecting, and stalled inside the ClientHello (a
    // record header promising 512 bytes, then nothing).
    for sent in [&b""[..], &b"\x16\x03\x01\x02\x00\x01"[..]] {
        let mut s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        s.write_all(sent).await.expect("write");
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a handshake stalled after {} bytes was not cut off: {read:?}",
            sent.len()
        );
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "cut off too early: {:?}",
            started.elapsed()
        );
    }

    // Connected, 200 ms before the handshake, 200 ms after it before the
    // head: 400 ms from the connection's start, served.
    let tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tls = tokio_rustls::TlsConnector::from(client_config(&ca, &[b"http/1.1"]))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("a handshake begun within the timeout");
    tokio::time::sleep(Duration::from_millis(200)).await;
    health_over(tls).await;
}

#[tokio::test]
async fn a_mismatched_certificate_and_key_is_a_config_error() {
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cert1, _) = pki(&["localhost"]);
    let (_, _, key2) = pki(&["localhost"]);
    std::fs::write(dir.path().join("server.crt"), &cert1).expect("write");
    std::fs::write(dir.path().join("server.key"), &key2).expect("write");
    let path = write_files(dir.path(), up.addr, &[], &tls_opts());
    let err = match scopegate::config::load(&path, &test_env) {
        Ok(_) => panic!("a mismatched certificate and key must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("listen.tls") && err.contains("server.crt"),
        "{err}"
    );
}

/// An HTTPS upstream with a certificate from its own CA; offers `alpn`
/// (h2 and http/1.1 from `server_tls` when `None`). It answers with the
/// version it was spoken to in and the `x-airbrx-tenant` it got.
async fn tls_upstream(
    cert_pem: &str,
    key_pem: &str,
    alpn: Option<&[&[u8]]>,
) -> std::net::SocketAddr {
    let mut cfg = server_tls(cert_pem, key_pem);
    if let Some(alpn) = alpn {
        Arc::make_mut(&mut cfg).alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!(
                            "{:?} {}",
                            req.version(),
                            req.headers()
                                .get("x-airbrx-tenant")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                        );
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_trusted_through_a_configured_ca() {
    let (ca, cert, key) = pki(&["localhost"]);
    let upstream = tls_upstream(&cert, &key, None).await;
    let tok = markers_jwt();

    // With the CA configured: forwarded over TLS, HTTP/2 negotiated by ALPN.
    let gw = https_gateway(upstream, Some(&ca), false).await;
    let r = get(gw.addr, "/v1/tenants/acme-prod/markers", &tok).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(String::from_utf8_lossy(&r.body), "HTTP/2.0 acme-prod");
    // hyper-util's pool keeps the connection, and the connector counts it:
    // ten requests, one connection opened.
    for _ in 0..9 {
        let r = get(gw.addr, "/v1/tenants/acme-prod/markers", &tok).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(
        metric(&gw.gw, "scopegate_upstream_connections_opened_total"),
        1.0
    );

    // Without it the web PKI roots do not know this CA: 502, never a pass.
    // A failed handshake is a failure to connect, as operators read it.
    let gw = https_gateway(upstream, None, false).await;
    let r = get(gw.addr, "/v1/tenants/acme-prod/markers", &tok).await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (502, "upstream_unavailable")
    );
    assert_eq!(upstream_errors(&gw), (1.0, 0.0), "(connect, protocol)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_that_speaks_http1_only_is_spoken_to_in_http1() {
    // HTTP/2 by ALPN only: `upstream.http2` (h2c prior knowledge) is for
    // plaintext upstreams (README), and an https one that chose http/1.1
    // gets it even with the key set.
    let (ca, cert, key) = pki(&["localhost"]);
    let upstream = tls_upstream(&cert, &key, Some(&[b"http/1.1"])).await;
    let gw = https_gateway(upstream, Some(&ca), true).await;
    let tok = markers_jwt();
    let r = get(gw.addr, "/v1/tenants/acme-prod/markers", &tok).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(String::from_utf8_lossy(&r.body), "HTTP/1.1 acme-prod");
}

/// A gateway whose upstream is `https://localhost:<port of up>`, trusted
/// through `ca` when given, else through the web PKI roots; `http2` sets
/// `upstream.http2`.
async fn https_gateway(up: std::net::SocketAddr, ca: Option<&str>, http2: bool) -> TestGateway {
    let port = up.port();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_line = match ca {
        Some(pem) => {
            std::fs::write(dir.path().join("upstream-ca.pem"), pem).expect("write");
            "\n  ca: upstream-ca.pem"
        }
        None => "",
    };
    let http2_line = if http2 { "\n  http2: true" } else { "" };
    let opts = Options {
        patch: Box::new(move |s| {
            s.replace("url: \"http://", "url: \"https://").replace(
                &format!("127.0.0.1:{port}\""),
                &format!("localhost:{port}\"{ca_line}{http2_line}"),
            )
        }),
        ..Default::default()
    };
    let path = write_files(dir.path(), up, &[], &opts);
    TestGateway::serve_from(path, dir).await
}

/// `scopegate_upstream_errors_total` of kinds connect and protocol.
fn upstream_errors(gw: &TestGateway) -> (f64, f64) {
    let kind = |k: &str| {
        metric(
            &gw.gw,
            &format!("scopegate_upstream_errors_total{{kind=\"{k}\"}}"),
        )
    };
    (kind("connect"), kind("protocol"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_that_hangs_up_unanswered_is_a_protocol_error() {
    // The handshake succeeds (hyper-util's connector is done), then the
    // upstream reads the request and closes without a byte of answer: the
    // exchange failed, not the connection, and the metric says so.
    let (ca, cert, key) = pki(&["localhost"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(&cert, &key));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
            });
        }
    });
    let gw = https_gateway(up, Some(&ca), false).await;
    let tok = markers_jwt();
    let r = get(gw.addr, "/v1/tenants/acme-prod/markers", &tok).await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (502, "upstream_unavailable")
    );
    assert_eq!(upstream_errors(&gw), (0.0, 1.0), "(connect, protocol)");
}

/// Over TLS as over TCP, a client that waits for `100 Continue` gets it
/// (the own HTTP/1 loop flushes it through the TLS layer) and then its
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_100_continue_over_tls_gets_it() {
    use tokio::io::AsyncWriteExt;
    let (ca, cert, key) = pki(&["localhost"]);
    let (up, gw) = tls_gateway(&cert, &key, &tls_opts()).await;
    let tok = es256(
        json!({"methods": ["POST"], "tags": ["markers"], "tenants": ["acme-prod"], "accounts": ["acme"]}),
    );
    let mut tls = tls_connect(gw.addr, client_config(&ca, &[b"http/1.1"]))
        .await
        .expect("tls");
    let head = format!(
        "POST /v1/tenants/acme-prod/markers HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {tok}\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.expect("write");
    assert_eq!(read_once(&mut tls).await, "HTTP/1.1 100 Continue\r\n\r\n");
    tls.write_all(b"hello").await.expect("write");
    let answer = read_once(&mut tls).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(up.last().map(|s| s.body_len), Some(5));
}
