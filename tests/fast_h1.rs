//! The listener's own HTTP/1 loop (src/server/fast.rs) against hyper's
//! server, on the same bytes from real sockets: two gateways serve the
//! same configuration in front of the same upstream, one with the loop
//! (`h1_fast_path: true`, the default) and one with hyper alone. Every
//! request, well-formed or not, pipelined or not, against upstream answers
//! of every framing, must give the same bytes back (but for `date` and the
//! generated request id) and leave the connection open or closed alike.
//! The upstream echoes the head and body it received, so a request the
//! two read differently shows as a different answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PtConfig, TestRunner};
use scopegate::proxy::Gateway;
use scopegate::server::{ServeOptions, serve_with};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a connection is watched for more bytes or its close. Both
/// gateways keep a connection open for 10 s between requests here, so an
/// open connection reads as open.
const WATCH: Duration = Duration::from_millis(1500);

/// The upstream's answer for `?case=NAME`; the request it received, head
/// and body as they came, is the body of `echo` (the default).
fn canned(case: &str, head: &[u8]) -> (Vec<u8>, bool) {
    // Made once: built for every answer, it kept the test's two threads
    // so busy (unoptimised) that connects to this upstream timed out.
    static BIG: std::sync::LazyLock<Vec<u8>> =
        std::sync::LazyLock::new(|| (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect());
    let big = &*BIG;
    let mut close = false;
    let out: Vec<u8> = match case {
        "chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec(),
        "chunked-trailers" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 1\r\n\r\n".to_vec(),
        "chunked-empty" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        "until-close" => {
            close = true;
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nread until the upstream closes".to_vec()
        }
        "no-content" => b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n".to_vec(),
        "not-modified" => b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 1234\r\n\r\n".to_vec(),
        "reason" => b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        "odd-status" => b"HTTP/1.1 299 Whatever\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        "not-found" => b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nnah".to_vec(),
        "teapot" => b"HTTP/1.1 418 I'm a teapot\r\ncontent-length: 0\r\n\r\n".to_vec(),
        "empty" => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
        "dated" => b"HTTP/1.1 200 OK\r\ndate: Mon, 01 Jan 2001 00:00:00 GMT\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        "cookies" => b"HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nset-cookie: b=2\r\nx-dup: 1\r\nX-Dup: 2\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        "connection-close" => {
            close = true;
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok".to_vec()
        }
        "big" => {
            let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", big.len()).into_bytes();
            v.extend_from_slice(big);
            v
        }
        "big-chunked" => {
            let mut v = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for part in big.chunks(7_001) {
                v.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                v.extend_from_slice(part);
                v.extend_from_slice(b"\r\n");
            }
            v.extend_from_slice(b"0\r\n\r\n");
            v
        }
        "short" => {
            close = true;
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec()
        }
        "chunked-broken" => {
            close = true;
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel".to_vec()
        }
        // An HTTP/1.0 upstream: no length, the body ends at its close.
        "http10" => {
            close = true;
            b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nread until the upstream closes".to_vec()
        }
        "http10-length" => b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        "server-error" => b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 4\r\n\r\nbusy".to_vec(),
        _ => {
            let mut v = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                head.len()
            )
            .into_bytes();
            v.extend_from_slice(head);
            v
        }
    };
    (out, close)
}

/// A raw upstream: reads a head (and a body it frames), answers by the
/// `case` in the query, keeps the connection unless the case closes it.
/// A request that expects `100 Continue` gets it before its body is read.
async fn upstream() -> SocketAddr {
    // Every case connects at once: `TcpListener::bind`'s queue of 128
    // overflowed, and a dropped SYN made a connect time out as a 502.
    let listener = scopegate::server::bind(([127, 0, 0, 1], 0).into(), 1024).expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = vec![0u8; 65536];
                loop {
                    // The head.
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let head: Vec<u8> = buf.drain(..end).collect();
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    // The body: by length, or chunked up to its last chunk
                    // (these tests send no trailers).
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    let chunked = text.contains("transfer-encoding: chunked");
                    // As a real server does, `100 Continue` to a request
                    // that expects it, before reading its body: a gateway
                    // must read past it and still send the body.
                    if text.contains("\r\nexpect: 100-continue\r\n")
                        && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
                    {
                        return;
                    }
                    let mut body = Vec::new();
                    loop {
                        let done = match (length, chunked) {
                            (_, true) => buf
                                .windows(5)
                                .position(|w| w == b"0\r\n\r\n")
                                .map(|i| i + 5),
                            (Some(n), false) => (buf.len() >= n).then_some(n),
                            (None, false) => Some(0),
                        };
                        if let Some(n) = done {
                            body.extend(buf.drain(..n));
                            break;
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let case = text
                        .split_once("case=")
                        .map(|(_, rest)| rest.split([' ', '&']).next().unwrap_or("").to_string())
                        .unwrap_or_default();
                    let (answer, close) = canned(&case, &[sorted(&head), body].concat());
                    if s.write_all(&answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A request head with its fields in order of name, keeping the order of
/// fields of one name: the in-future client (src/h1.rs, which carries the
/// own loop's bodies) writes `Host` and the gateway's fields first, and
/// hyper's client writes them last. Which comes first is no difference to
/// an upstream; which value comes first within a name is, and stays.
fn sorted(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head).into_owned();
    let mut lines: Vec<&str> = text.trim_end_matches("\r\n").split("\r\n").collect();
    if lines.len() > 2 {
        let fields = &mut lines[1..];
        fields.sort_by_key(|l| l.split(':').next().unwrap_or("").to_ascii_lowercase());
    }
    let mut out = lines.join("\r\n").into_bytes();
    out.extend_from_slice(b"\r\n\r\n");
    out
}

struct Pair {
    fast: SocketAddr,
    hyper: SocketAddr,
    /// The gateway with the own loop, for its served count.
    own: std::sync::Arc<Gateway>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn gateway(
    up: SocketAddr,
    pats: &[&Pat],
    fast: bool,
) -> (SocketAddr, std::sync::Arc<Gateway>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        patch: Box::new(|s| {
            format!(
                "{s}limits: {{ idle_timeout: 20s, header_read_timeout: 10s, max_header_bytes: 8192 }}\n"
            )
        }),
        ..Default::default()
    };
    let path = write_files(dir.path(), up, pats, &opts);
    let snap = scopegate::config::load(&path, &test_env).expect("config");
    let gw = Gateway::new(snap).expect("gateway");
    let listener = scopegate::server::bind(([127, 0, 0, 1], 0).into(), 1024).expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve_with(
        listener,
        gw.clone(),
        std::future::pending(),
        ServeOptions { h1_fast_path: fast },
    ));
    (addr, gw, dir)
}

async fn pair(pats: &[&Pat]) -> Pair {
    let up = upstream().await;
    let (fast, own, d1) = gateway(up, pats, true).await;
    let (hyper, _, d2) = gateway(up, pats, false).await;
    Pair {
        fast,
        hyper,
        own,
        _dirs: vec![d1, d2],
    }
}

/// What a client saw: the bytes, with `date` values and request ids made
/// constant, and whether the server closed the connection.
#[derive(Debug, PartialEq)]
struct Seen {
    bytes: String,
    closed: bool,
}

/// Write `parts` (with a short pause between them, so they arrive as
/// separate reads), then read until the server closes or [`WATCH`] passes.
async fn exchange(addr: SocketAddr, parts: &[Vec<u8>]) -> Seen {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + WATCH;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    Seen {
        bytes: normalise(&dechunk(&got)),
        closed,
    }
}

/// Chunked bodies rewritten as one chunk: where a body's chunks break
/// depends on how the upstream's bytes arrived, not on the server, so
/// neither the sizes nor the number of chunks are compared. What is kept
/// of the size lines is the case of their hex letters over the whole body
/// (`upper`, `lower`, `mixed`, or `none` when no size had a letter), which
/// a server chooses. An answer that ends before its last chunk keeps
/// `<incomplete>`.
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = &rest[..end + 4];
        out.extend_from_slice(head);
        rest = &rest[end + 4..];
        let lower = String::from_utf8_lossy(head).to_ascii_lowercase();
        if lower.contains("transfer-encoding: chunked") {
            let mut body = Vec::new();
            let (mut upper, mut lower) = (false, false);
            let complete = loop {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                    break false;
                };
                let line = String::from_utf8_lossy(&rest[..eol]).into_owned();
                let Ok(n) = usize::from_str_radix(line.trim(), 16) else {
                    break false;
                };
                upper |= line.bytes().any(|b| b.is_ascii_uppercase());
                lower |= line.bytes().any(|b| b.is_ascii_lowercase());
                if n == 0 {
                    if rest.len() >= eol + 4 && &rest[eol + 2..eol + 4] == b"\r\n" {
                        rest = &rest[eol + 4..];
                        break true;
                    }
                    break false;
                }
                if rest.len() < eol + 2 + n + 2 {
                    break false;
                }
                body.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
                rest = &rest[eol + 2 + n + 2..];
            };
            let case = match (upper, lower) {
                (true, true) => "mixed",
                (true, false) => "upper",
                (false, true) => "lower",
                (false, false) => "none",
            };
            out.extend_from_slice(
                format!("<chunked, size lines {case}, {} bytes>", body.len()).as_bytes(),
            );
            out.extend_from_slice(&body);
            if !complete {
                out.extend_from_slice(b"<incomplete>");
                out.extend_from_slice(rest);
                return out;
            }
        } else if let Some(n) = lower
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            let take = n.min(rest.len());
            out.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
    }
    out.extend_from_slice(rest);
    out
}

/// `date` values and generated request ids (32 hex digits, in a header
/// and in bodies) replaced, so two runs compare equal.
fn normalise(raw: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(raw).into_owned();
    let ids: Vec<String> = text
        .split("\r\n")
        .filter_map(|l| l.strip_prefix("x-request-id: "))
        .map(str::to_string)
        .collect();
    for id in ids {
        if id.len() == 32 {
            text = text.replace(&id, "<request-id>");
        }
    }
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split("\r\n").enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        if line.starts_with("date: ") && !line.contains("2001") {
            out.push_str("date: <now>");
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Run every case at once (each waits up to [`WATCH`]); the differences.
async fn run_all(p: &Pair, cases: Vec<(String, Vec<Vec<u8>>)>) -> Vec<String> {
    let mut set = tokio::task::JoinSet::new();
    for (name, parts) in cases {
        let (fast, hyper) = (p.fast, p.hyper);
        set.spawn(async move { compare(fast, hyper, &name, parts).await });
    }
    let mut failed = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Err(e) = r.expect("case task") {
            failed.push(e);
        }
    }
    failed
}

async fn compare(
    fast: SocketAddr,
    hyper: SocketAddr,
    name: &str,
    parts: Vec<Vec<u8>>,
) -> Result<(), String> {
    let (a, b) = tokio::join!(exchange(fast, &parts), exchange(hyper, &parts));
    let cut = |s: &str| -> String {
        if s.len() > 1200 {
            format!(
                "{}…({} bytes)",
                s.chars().take(1200).collect::<String>(),
                s.len()
            )
        } else {
            s.to_string()
        }
    };
    // A request with a body goes upstream through the in-future client
    // with the loop and through hyper's client without it; when the
    // upstream breaks off a chunked answer, hyper's client hands on the
    // part of a chunk it has, the in-future client does not. Either way
    // the client sees an answer cut off and the connection closed.
    let cut_off = |s: &Seen| s.closed && (s.bytes.is_empty() || s.bytes.ends_with("<incomplete>"));
    if a == b
        || (name.contains("broken answer") && cut_off(&a) && cut_off(&b))
        || fresh_error_after_http10(&a, &b)
    {
        Ok(())
    } else {
        Err(format!(
            "{name}: the two paths differ\nrequest: {:?}\nown loop ({}): {:?}\nhyper ({}): {:?}",
            parts
                .iter()
                .map(|x| cut(&String::from_utf8_lossy(x)))
                .collect::<Vec<_>>(),
            if a.closed { "closed" } else { "open" },
            cut(&a.bytes),
            if b.closed { "closed" } else { "open" },
            cut(&b.bytes),
        ))
    }
}

/// The one known difference: after the own loop served an HTTP/1.0
/// request, a head it hands over goes to a fresh hyper connection, and
/// hyper's answer to a head it cannot parse says `HTTP/1.1` and
/// `connection: close`; hyper that served the HTTP/1.0 request itself
/// answers in HTTP/1.0 (its `enforce_version` keeps the last request's
/// version), without the line. Both close. True only for exactly that:
/// the same bytes before, an HTTP/1.0 answer among them, the same error
/// status, the same bytes after.
fn fresh_error_after_http10(own: &Seen, hyper: &Seen) -> bool {
    let (Some(i), Some(j)) = (own.bytes.rfind("HTTP/1.1 "), hyper.bytes.rfind("HTTP/1.0 ")) else {
        return false;
    };
    let (before, own_tail) = own.bytes.split_at(i);
    let (hyper_before, hyper_tail) = hyper.bytes.split_at(j);
    let (Some(own_tail), Some(hyper_tail)) = (own_tail.get(9..), hyper_tail.get(9..)) else {
        return false;
    };
    let Some((status, own_rest)) = own_tail.split_once("\r\n") else {
        return false;
    };
    let (Some(own_after), Some(hyper_after)) = (
        own_rest.strip_prefix("connection: close\r\n"),
        hyper_tail
            .strip_prefix(status)
            .and_then(|r| r.strip_prefix("\r\n")),
    ) else {
        return false;
    };
    own.closed
        && hyper.closed
        && before == hyper_before
        && before.contains("HTTP/1.0 ")
        && (status.starts_with('4') || status.starts_with('5'))
        && own_after == hyper_after
}

#[test]
fn only_the_known_difference_is_let_through() {
    let seen = |bytes: &str| Seen {
        bytes: bytes.to_string(),
        closed: true,
    };
    let ok = "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n";
    let own =
        format!("{ok}HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
    let hyper = format!("{ok}HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
    assert!(fresh_error_after_http10(&seen(&own), &seen(&hyper)));
    for (o, h) in [
        // Another status.
        (
            own.clone(),
            hyper.replace("400 Bad Request", "431 Too Large"),
        ),
        // Other bytes after.
        (own.clone(), hyper.replace("length: 0", "length: 1")),
        // No HTTP/1.0 answer before.
        (
            own.replace("HTTP/1.0 200", "HTTP/1.1 200"),
            hyper.replace("HTTP/1.0 200", "HTTP/1.1 200"),
        ),
        // Not an error.
        (
            own.replace("400 Bad Request", "200 OK"),
            hyper.replace("400 Bad Request", "200 OK"),
        ),
        // Without the line.
        (own.replace("connection: close\r\n", ""), hyper.clone()),
    ] {
        assert!(
            !fresh_error_after_http10(&seen(&o), &seen(&h)),
            "{o:?} / {h:?}"
        );
    }
    let open = Seen {
        bytes: own,
        closed: false,
    };
    assert!(!fresh_error_after_http10(&open, &seen(&hyper)));
}

fn token() -> String {
    es256(
        json!({"methods": ["GET", "POST", "DELETE"], "tags": ["markers", "rules"], "tenants": ["acme-prod"], "accounts": ["acme"]}),
    )
}

/// A request with a token and a request id, then the `extra` fields.
fn request(method: &str, version: &str, target: &str, token: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/{version}\r\nhost: gw\r\nauthorization: Bearer {token}\r\nx-request-id: rid-1\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn http10(target: &str, token: &str, extra: &str) -> Vec<u8> {
    request("GET", "1.0", target, token, extra)
}

fn get(target: &str, token: &str, extra: &str) -> Vec<u8> {
    request("GET", "1.1", target, token, extra)
}

const M: &str = "/v1/tenants/acme-prod/markers";

/// `n` header fields `x-hI: I`.
fn fields(n: usize) -> String {
    (0..n).map(|i| format!("x-h{i}: {i}\r\n")).collect()
}

/// How many of a case's requests the own loop serves: at least, at most.
type Served = (u64, u64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_requests_and_answers_are_alike() {
    let p = pair(&[]).await;
    let t = token();
    // Each case with the number of its requests the own loop must serve,
    // at least and at most (an answer whose upstream broke is not served:
    // it is cut off).
    let mut cases: Vec<(String, Vec<Vec<u8>>, Served)> = Vec::new();
    let own = std::cell::Cell::new(1u64);
    let mut one = |name: &str, bytes: Vec<u8>| {
        cases.push((name.to_string(), vec![bytes], (own.get(), own.get())))
    };
    for case in [
        "echo",
        "chunked",
        "chunked-trailers",
        "chunked-empty",
        "until-close",
        "no-content",
        "not-modified",
        "reason",
        "odd-status",
        "not-found",
        "teapot",
        "empty",
        "dated",
        "cookies",
        "connection-close",
        "big",
        "big-chunked",
        "http10",
        "http10-length",
        "short",
        "chunked-broken",
        "server-error",
    ] {
        let broken = matches!(case, "short" | "chunked-broken");
        own.set(u64::from(!broken));
        one(case, get(&format!("{M}?case={case}"), &t, ""));
        // The same answers to HTTP/1.0 (no chunks: a body of unknown size
        // ends with the connection) and to HEAD (no body, whatever the
        // length says; so an upstream's broken body is no matter).
        one(
            &format!("HTTP/1.0 {case}"),
            http10(&format!("{M}?case={case}"), &t, ""),
        );
        own.set(1);
        one(
            &format!("HEAD {case}"),
            request("HEAD", "1.1", &format!("{M}?case={case}"), &t, ""),
        );
    }
    own.set(1);
    // Denials and gateway answers.
    one(
        "no token",
        b"GET /v1/tenants/acme-prod/markers HTTP/1.1\r\nhost: gw\r\n\r\n".to_vec(),
    );
    one("no route", get("/v1/nowhere", &t, ""));
    one(
        "other tenant",
        get("/v1/tenants/globex-web/markers", &t, ""),
    );
    one(
        "public",
        b"GET /v1/health HTTP/1.1\r\nhost: gw\r\n\r\n".to_vec(),
    );
    one(
        "no request id",
        format!("GET {M} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\n\r\n").into_bytes(),
    );
    one(
        "ambiguous path",
        get("/v1/tenants/acme-prod/../globex-web/markers", &t, ""),
    );
    one(
        "encoded path",
        get("/v1/tenants/acme%2Dprod/markers", &t, ""),
    );
    one("query", get(&format!("{M}?a=1&b=%20"), &t, ""));
    one(
        "method not allowed",
        format!("PATCH {M} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\n\r\n").into_bytes(),
    );
    one("delete", format!("DELETE /v1/tenants/acme-prod/rules/r1 HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\nx-request-id: rid-2\r\n\r\n").into_bytes());
    one(
        "options",
        format!("OPTIONS {M} HTTP/1.1\r\nhost: gw\r\n\r\n").into_bytes(),
    );
    one(
        "extension method",
        format!("PURGE {M} HTTP/1.1\r\nhost: gw\r\n\r\n").into_bytes(),
    );
    // What the loop serves itself, at its edges.
    one(
        "HEAD",
        format!("HEAD {M} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\n\r\n").into_bytes(),
    );
    one(
        "HEAD denied",
        format!("HEAD {M} HTTP/1.1\r\nhost: gw\r\n\r\n").into_bytes(),
    );
    one("HEAD, connection close", format!("HEAD {M} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\nconnection: close\r\n\r\n").into_bytes());
    one(
        "HTTP/1.0",
        format!("GET {M} HTTP/1.0\r\nauthorization: Bearer {t}\r\nx-request-id: rid-1\r\n\r\n")
            .into_bytes(),
    );
    one("HTTP/1.0 keep-alive", format!("GET {M} HTTP/1.0\r\nconnection: keep-alive\r\nauthorization: Bearer {t}\r\nx-request-id: rid-1\r\n\r\n").into_bytes());
    one(
        "HTTP/1.0 keep-alive, chunked answer",
        http10(
            &format!("{M}?case=chunked"),
            &t,
            "connection: keep-alive\r\n",
        ),
    );
    one("HTTP/1.0 denied", http10(M, "nope", ""));
    one("HTTP/1.0 public", http10("/v1/health", "", ""));
    one(
        "HTTP/1.0 connection close",
        http10(M, &t, "connection: close\r\n"),
    );
    one(
        "HTTP/1.0 HEAD",
        format!("HEAD {M}?case=chunked HTTP/1.0\r\nauthorization: Bearer {t}\r\n\r\n").into_bytes(),
    );
    one("HTTP/1.0 POST", {
        let mut r =
            format!("POST {M} HTTP/1.0\r\nauthorization: Bearer {t}\r\ncontent-length: 5\r\n\r\n")
                .into_bytes();
        r.extend_from_slice(b"hello");
        r
    });
    one("content-length 0", get(M, &t, "content-length: 0\r\n"));
    one("keep-alive", get(M, &t, "connection: keep-alive\r\n"));
    // A client that closes after its request: answered with
    // `connection: close`, then the connection ends, as hyper does it.
    one("connection close", get(M, &t, "connection: close\r\n"));
    one("connection Close", get(M, &t, "Connection:  Close \r\n"));
    one(
        "connection close, denied",
        get(M, "nope", "connection: close\r\n"),
    );
    one(
        "connection close, upstream closes too",
        get(
            &format!("{M}?case=connection-close"),
            &t,
            "connection: close\r\n",
        ),
    );
    one(
        "connection close, chunked answer",
        get(&format!("{M}?case=chunked"), &t, "connection: close\r\n"),
    );
    one("connection close with a body", {
        let mut r = get(M, &t, "connection: close\r\ncontent-length: 4\r\n");
        r.extend_from_slice(b"abcd");
        r
    });
    // The request after a close is never answered, by either.
    one(
        "connection close, then pipelined",
        [get(M, &t, "connection: close\r\n"), get(M, &t, "")].concat(),
    );
    one(
        "leading empty lines",
        [b"\r\n\r\n".to_vec(), get(M, &t, "")].concat(),
    );
    one(
        "bare LF",
        format!("GET {M} HTTP/1.1\nhost: gw\nauthorization: Bearer {t}\nx-request-id: rid-1\n\n")
            .into_bytes(),
    );
    one(
        "obs-text value",
        [
            get(M, &t, "x-note: caf")[..]
                .strip_suffix(b"\r\n")
                .unwrap()
                .to_vec(),
            b"\xe9\r\n\r\n".to_vec(),
        ]
        .concat(),
    );
    one("many headers", get(M, &t, &fields(90)));
    one("duplicate host", get(M, &t, "host: other\r\n"));
    one(
        "x-forwarded-for",
        get(M, &t, "x-forwarded-for: 10.0.0.1\r\n"),
    );
    one(
        "spoofed identity",
        get(M, &t, "x-airbrx-tenant: globex-web\r\n"),
    );
    one(
        "hop-by-hop named",
        get(M, &t, "keep-alive: timeout=1\r\nproxy-authorization: x\r\n"),
    );
    // A method is a token: case matters, and hyper takes it too.
    one(
        "lower-case method",
        format!("get {M} HTTP/1.1\r\nhost: gw\r\n\r\n").into_bytes(),
    );
    one("length 00", get(M, &t, "content-length: 00\r\n"));
    // Bodies that arrived with their heads.
    let post = |target: &str, extra: &str, body: &[u8]| -> Vec<u8> {
        [
            format!("POST {target} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\nx-request-id: rid-1\r\ncontent-length: {}\r\n{extra}\r\n", body.len()).into_bytes(),
            body.to_vec(),
        ]
        .concat()
    };
    one("POST with body", post(M, "", b"hello"));
    one(
        "body with odd bytes",
        post(M, "", b"\r\n\r\nGET / HTTP/1.1\r\n\r\n\0\xff"),
    );
    one("body, leading zero", {
        let mut r = post(M, "", b"abc");
        let at = r
            .windows(17)
            .position(|w| w == b"content-length: 3")
            .unwrap();
        r.splice(at + 16..at + 16, *b"0");
        r
    });
    one("body of the bound", post(M, "", &vec![b'b'; 16 * 1024]));
    one(
        "body, denied",
        post("/v1/tenants/globex-web/markers", "", b"{\"a\": 1}"),
    );
    one("body, no route", post("/v1/nowhere", "", b"x"));
    one(
        "body, chunked answer",
        post(&format!("{M}?case=chunked"), "", b"xyz"),
    );
    own.set(0);
    one(
        "body, broken answer",
        post(&format!("{M}?case=chunked-broken"), "", b"xyz"),
    );
    own.set(1);
    one("GET with a body", {
        let mut r = get(M, &t, "content-length: 4\r\n");
        r.extend_from_slice(b"abcd");
        r
    });
    // Bodies the own loop streams: over the bound, or not all there.
    one(
        "body over the bound",
        post(M, "", &vec![b'b'; 16 * 1024 + 1]),
    );
    one("big body", post(M, "", &vec![b'c'; 300_000]));
    own.set(2);
    one(
        "big body, then a request",
        [post(M, "", &vec![b'd'; 70_000]), get(M, &t, "")].concat(),
    );
    one(
        "body over the bound, then a request",
        [post(M, "", &vec![b'd'; 20_000]), get(M, &t, "")].concat(),
    );
    own.set(1);
    one(
        "big body, denied",
        post("/v1/tenants/globex-web/markers", "", &vec![b'e'; 200_000]),
    );
    one(
        "body over the bound, denied, then a request",
        [
            post("/v1/tenants/globex-web/markers", "", &vec![b'e'; 20_000]),
            get(M, &t, ""),
        ]
        .concat(),
    );
    one(
        "big body, no route",
        post("/v1/nowhere", "", &vec![b'f'; 100_000]),
    );
    one(
        "big body, answered early",
        post(&format!("{M}?case=not-found"), "", &vec![b'g'; 100_000]),
    );
    one(
        "big body in HTTP/1.0",
        format!(
            "POST {M} HTTP/1.0\r\nauthorization: Bearer {t}\r\ncontent-length: 30000\r\n\r\n{}",
            "h".repeat(30_000)
        )
        .into_bytes(),
    );
    // Never answered within the watch: the body never ends.
    own.set(0);
    one("body cut short", {
        let mut r = post(M, "", b"hello");
        r.truncate(r.len() - 2);
        r
    });
    one("big body cut short", {
        let mut r = post(M, "", &vec![b'i'; 100_000]);
        r.truncate(r.len() - 2);
        r
    });
    // What goes to hyper.
    one("POST chunked", format!("POST {M} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\nx-request-id: rid-1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").into_bytes());
    one(
        "connection close, listed",
        get(M, &t, "connection: close, x-a\r\n"),
    );
    one(
        "connection close, twice",
        get(M, &t, "connection: close\r\nconnection: close\r\n"),
    );
    one(
        "connection close and keep-alive",
        get(M, &t, "connection: keep-alive\r\nconnection: close\r\n"),
    );
    one(
        "connection upgrade",
        get(M, &t, "connection: upgrade\r\nupgrade: websocket\r\n"),
    );
    one(
        "expect, another",
        post(M, "expect: something\r\n", b"hello"),
    );
    one(
        "expect, twice",
        post(
            M,
            "expect: 100-continue\r\nexpect: 100-continue\r\n",
            b"hello",
        ),
    );
    one("te trailers", get(M, &t, "te: trailers\r\n"));
    one(
        "two lengths",
        get(M, &t, "content-length: 0\r\ncontent-length: 0\r\n"),
    );
    one(
        "length and chunked",
        get(M, &t, "content-length: 0\r\ntransfer-encoding: chunked\r\n"),
    );
    one(
        "HTTP/2 preface",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
    );
    one(
        "HTTP/1.2",
        format!("GET {M} HTTP/1.2\r\nhost: gw\r\n\r\n").into_bytes(),
    );
    one("absolute form", get(&format!("http://gw{M}"), &t, ""));
    one(
        "asterisk",
        b"OPTIONS * HTTP/1.1\r\nhost: gw\r\n\r\n".to_vec(),
    );
    one(
        "authority form",
        b"CONNECT gw:443 HTTP/1.1\r\nhost: gw\r\n\r\n".to_vec(),
    );
    one("space before colon", get(M, &t, "x-bad : 1\r\n"));
    one("obs-fold", get(M, &t, "x-fold: a\r\n b\r\n"));
    one("NUL in value", get(M, &t, "x-nul: a\0b\r\n"));
    one(
        "bad method",
        format!("G(T {M} HTTP/1.1\r\nhost: gw\r\n\r\n").into_bytes(),
    );
    one("too many headers", get(M, &t, &fields(120)));
    one(
        "head over the limit",
        get(M, &t, &format!("x-big: {}\r\n", "a".repeat(9000))),
    );
    one(
        "target with a space",
        b"GET /v1/a b HTTP/1.1\r\nhost: gw\r\n\r\n".to_vec(),
    );
    one(
        "garbage",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
    );
    one(
        "partial head",
        format!("GET {M} HTTP/1.1\r\nhost: gw\r\n").into_bytes(),
    );
    one("empty", Vec::new());
    // Several requests on one connection: pipelined in one write, and
    // in separate writes, including one that moves the connection to hyper
    // halfway.
    cases.push((
        "pipelined".into(),
        vec![
            [
                get(M, &t, ""),
                get(&format!("{M}?case=chunked"), &t, ""),
                get(&format!("{M}?case=no-content"), &t, ""),
            ]
            .concat(),
        ],
        (3, 3),
    ));
    cases.push((
        "one after another".into(),
        vec![
            get(M, &t, ""),
            get(&format!("{M}?case=reason"), &t, ""),
            get("/v1/nowhere", &t, ""),
        ],
        (3, 3),
    ));
    cases.push((
        "then a body".into(),
        vec![[get(M, &t, ""), post(M, "", b"abc"), get(M, &t, "")].concat()],
        (3, 3),
    ));
    cases.push((
        "bodies one after another".into(),
        vec![post(M, "", b"one"), post(M, "", b"two"), get(M, &t, "")],
        (3, 3),
    ));
    // A body that comes in a later write than its head is not waited for:
    // the own loop streams it.
    let head_only = |body: &[u8]| {
        let mut r = post(M, "", body);
        r.truncate(r.len() - body.len());
        r
    };
    cases.push((
        "body in a later write".into(),
        vec![head_only(b"later"), b"later".to_vec(), get(M, &t, "")],
        (2, 2),
    ));
    cases.push((
        "body in two writes".into(),
        vec![
            get(M, &t, ""),
            [head_only(b"later"), b"la".to_vec()].concat(),
            [b"ter".to_vec(), get(M, &t, "")].concat(),
        ],
        (3, 3),
    ));
    let big = vec![b'j'; 50_000];
    cases.push((
        "big body in three writes".into(),
        vec![
            [head_only(&big), big[..10_000].to_vec()].concat(),
            big[10_000..30_000].to_vec(),
            [&big[30_000..], &get(M, &t, "")[..]].concat(),
        ],
        (2, 2),
    ));
    cases.push((
        "then HTTP/1.0".into(),
        vec![
            get(M, &t, ""),
            format!("GET {M} HTTP/1.0\r\nauthorization: Bearer {t}\r\nx-request-id: rid-1\r\n\r\n")
                .into_bytes(),
        ],
        (2, 2),
    ));
    cases.push((
        "then HTTP/1.0 keep-alive, then garbage".into(),
        vec![
            get(M, &t, ""),
            http10(M, &t, "connection: keep-alive\r\n"),
            b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
        ],
        (2, 2),
    ));
    cases.push((
        "HTTP/1.0 kept alive twice, then HTTP/1.1".into(),
        vec![
            http10(M, &t, "connection: keep-alive\r\n"),
            http10(M, &t, "connection: keep-alive\r\n"),
            get(M, &t, ""),
        ],
        (3, 3),
    ));
    cases.push((
        "HTTP/1.0, then more in the same write".into(),
        vec![[http10(M, &t, ""), get(M, &t, "")].concat()],
        (1, 1),
    ));
    cases.push((
        "then garbage".into(),
        vec![get(M, &t, ""), b"NOT HTTP AT ALL\r\n\r\n".to_vec()],
        (1, 1),
    ));
    cases.push((
        "then close".into(),
        vec![
            get(M, &t, ""),
            get(M, &t, "connection: close\r\n"),
            get(M, &t, ""),
        ],
        (2, 2),
    ));
    cases.push((
        "split head".into(),
        vec![
            b"GET /v1/tenants/acme-".to_vec(),
            [
                b"prod/markers HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer ".to_vec(),
                t.clone().into_bytes(),
                b"\r\nx-request-id: rid-1\r\n".to_vec(),
            ]
            .concat(),
            b"\r\n".to_vec(),
        ],
        (1, 1),
    ));
    // `Expect: 100-continue`: the own loop's `100 Continue` goes when the
    // body is first wanted, as hyper's does; none without a body, none in
    // HTTP/1.0, none for a request denied before its body is wanted (and
    // then the body, not there, is not waited for: the connection ends).
    // Each: a head for a body of `len` bytes with `now` of them, then the
    // rest in a write of its own, then a request if any.
    let expecting = |target: &str, extra: &str, len: usize, now: usize| -> Vec<u8> {
        let head = format!(
            "POST {target} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\nx-request-id: rid-1\r\ncontent-length: {len}\r\n{extra}\r\n"
        );
        [head.into_bytes(), vec![b'k'; now]].concat()
    };
    let expect = "expect: 100-continue\r\n";
    let denied = "/v1/tenants/globex-web/markers";
    for (name, first, rest, then, served) in [
        (
            "expect, body at once",
            expecting(M, expect, 5, 5),
            0,
            false,
            1,
        ),
        (
            "expect, in capitals",
            expecting(M, "Expect: 100-Continue\r\n", 5, 5),
            0,
            false,
            1,
        ),
        ("expect, body after", expecting(M, expect, 5, 0), 5, true, 2),
        (
            "expect, part of the body at once",
            expecting(M, expect, 5, 2),
            3,
            true,
            2,
        ),
        (
            "expect, big body at once",
            expecting(M, expect, 50_000, 50_000),
            0,
            true,
            2,
        ),
        (
            "expect, big body after",
            expecting(M, expect, 50_000, 0),
            50_000,
            true,
            2,
        ),
        ("expect, no body", get(M, &t, expect), 0, true, 2),
        (
            "expect, answered early",
            expecting(&format!("{M}?case=not-found"), expect, 5, 0),
            5,
            true,
            2,
        ),
        // The body never sent: whether a body sent later came before the
        // answer would be a race between the client and the gateway.
        (
            "expect, denied",
            expecting(denied, expect, 5, 0),
            0,
            false,
            1,
        ),
        (
            "expect, denied, body at once",
            expecting(denied, expect, 5, 5),
            0,
            true,
            2,
        ),
    ] {
        let mut parts = vec![first];
        if rest > 0 {
            parts.push(vec![b'k'; rest]);
        }
        if then {
            parts.push(get(M, &t, ""));
        }
        cases.push((name.into(), parts, (served, served)));
    }
    cases.push((
        "expect, HTTP/1.0".into(),
        vec![format!("POST {M} HTTP/1.0\r\nauthorization: Bearer {t}\r\n{expect}content-length: 5\r\n\r\nhello").into_bytes()],
        (1, 1),
    ));
    cases.push((
        "after the upstream broke".into(),
        vec![
            get(&format!("{M}?case=chunked-broken"), &t, ""),
            get(M, &t, ""),
        ],
        (0, 0),
    ));

    let least: u64 = cases.iter().map(|c| c.2.0).sum();
    let most: u64 = cases.iter().map(|c| c.2.1).sum();
    let failed = run_all(&p, cases.into_iter().map(|(n, b, _)| (n, b)).collect()).await;
    assert!(
        failed.is_empty(),
        "{} case(s) differ:\n\n{}",
        failed.len(),
        failed.join("\n\n")
    );
    // And the own loop served what it should, not fewer (which the
    // comparison alone would not show): counted as each connection ends.
    served_at_least(&p.own, least).await;
    // The clients have all gone: what is left to count comes at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = p
        .own
        .own_h1_served
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (least..=most).contains(&n),
        "requests served by the own loop: {n}, not in {least}..={most}"
    );
}

/// Request heads built from parts that are each sometimes wrong: the two
/// paths must still answer alike.
fn head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        4 => Just("GET".to_string()),
        1 => Just("DELETE".to_string()),
        1 => Just("POST".to_string()),
        1 => Just("HEAD".to_string()),
        1 => "[A-Za-z(]{1,7}",
    ];
    let target = prop_oneof![
        4 => Just(M.to_string()),
        1 => Just(format!("{M}?case=chunked")),
        1 => Just("/v1/tenants/acme-prod/rules/r1".to_string()),
        1 => Just("/v1/health".to_string()),
        1 => "/[a-z0-9/%.?=&-]{0,30}",
        1 => "[ -~]{0,12}",
    ];
    let version = prop_oneof![
        6 => Just("HTTP/1.1"),
        1 => Just("HTTP/1.0"),
        1 => Just("HTTP/2.0"),
        1 => Just("HTTP/1.1 "),
    ];
    let field = prop_oneof![
        3 => Just("authorization: Bearer {T}".to_string()),
        2 => Just("x-request-id: rid-9".to_string()),
        1 => Just("content-length: 0".to_string()),
        1 => Just("content-length: 2".to_string()),
        1 => Just("connection: keep-alive".to_string()),
        1 => Just("connection: close".to_string()),
        1 => Just("transfer-encoding: chunked".to_string()),
        1 => Just("expect: 100-continue".to_string()),
        1 => Just("Expect: 100-Continue".to_string()),
        1 => Just("content-length: 5".to_string()),
        1 => "x-[a-z]{1,8}: [ -~]{0,20}",
        1 => "[!-~]{1,10}: [\t -~\u{80}-\u{ff}]{0,10}",
        1 => "[ -~]{0,20}",
    ];
    let eol = prop_oneof![8 => Just("\r\n"), 1 => Just("\n")];
    (
        method,
        target,
        version,
        proptest::collection::vec((field, eol.clone()), 0..8),
        eol,
        proptest::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(m, t, v, fields, end, tail)| {
            let mut h = format!("{m} {t} {v}\r\nhost: gw\r\n");
            for (f, e) in fields {
                h.push_str(&f.replace("{T}", &token()));
                h.push_str(e);
            }
            h.push_str(end);
            let mut b = h.into_bytes();
            b.extend_from_slice(&tail);
            b
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_are_answered_alike() {
    let p = pair(&[]).await;
    let mut runner = TestRunner::new(PtConfig {
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        ..PtConfig::default()
    });
    let strategy = proptest::collection::vec(head(), 1..3);
    // Batches run at once: each case waits [`WATCH`] for a close.
    let mut failed = Vec::new();
    for _ in 0..4 {
        let batch: Vec<(String, Vec<Vec<u8>>)> = (0..48)
            .map(|i| {
                let v = strategy.new_tree(&mut runner).expect("case").current();
                // Pipelined in one write.
                (format!("generated {i}"), vec![v.concat()])
            })
            .collect();
        failed.extend(run_all(&p, batch).await);
    }
    assert!(
        failed.is_empty(),
        "{} case(s) differ:\n\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}

/// Send a POST head for a body of `whole` bytes and the body's first
/// `first` bytes, in one write; the body's bytes are `fill`.
async fn start_post(s: &mut TcpStream, target: &str, first: usize, whole: usize, fill: u8) {
    let t = token();
    let head = format!(
        "POST {target} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\ncontent-length: {whole}\r\n\r\n"
    );
    s.write_all(&[head.as_bytes(), &vec![fill; first][..]].concat())
        .await
        .expect("write");
}

/// Read until what came ends with `end`, within 5 s a read.
async fn read_until(s: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    read_until_done(s, |got| got.ends_with(end)).await
}

/// Read until `done` says what came is all, within 5 s a read.
async fn read_until_done(s: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !done(&got) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Requests the own loop of `gw` has served, once that reaches `least` or
/// 5 s pass (a connection's count is added as it ends).
async fn served_at_least(gw: &Gateway, least: u64) -> u64 {
    let served = || gw.own_h1_served.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while served() < least && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    served()
}

/// A body that is not all there with its head is never waited for: the
/// own loop sends the head on at once and streams the body as it comes
/// (SPEC §7), a small one that came late as well as one over the bound.
/// The differential cases above cannot show this for sure, as a slow
/// server may meet two writes together; here the client sends the rest
/// only once the upstream has had the head and the first part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_late_is_streamed_not_waited_for() {
    // An upstream that reports how much of the current request's body it
    // has had (`None` before its head), and answers with the body's size
    // once it has it all.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up = listener.local_addr().expect("addr");
    let (progress, mut seen) = tokio::sync::watch::channel(None::<usize>);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = vec![0u8; 65536];
                loop {
                    let n = match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&tmp[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let got = buf.len() - end - 4;
                    progress.send_replace(Some(got));
                    if got >= length {
                        let answer =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-got: {got}\r\n\r\n");
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        buf.clear();
                        progress.send_replace(None);
                    }
                }
            });
        }
    });
    let (addr, gw, _dir) = gateway(up, &[], true).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    for (first, whole) in [(0, 5), (3, 5), (10_000, 40_000)] {
        start_post(&mut s, M, first, whole, b'x').await;
        // The head and the first part reach the upstream before the rest
        // is sent: a gateway waiting for the whole body stops here.
        tokio::time::timeout(
            Duration::from_secs(5),
            seen.wait_for(|p| p.is_some_and(|got| got >= first)),
        )
        .await
        .unwrap_or_else(|_| panic!("the head and {first} bytes were not sent on"))
        .expect("upstream");
        s.write_all(&vec![b'x'; whole - first])
            .await
            .expect("write");
        let got = read_until(&mut s, b"\r\n\r\n").await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains(&format!("x-got: {whole}\r\n")), "{text}");
    }
    // All three on the one connection, by the own loop.
    drop(s);
    assert_eq!(served_at_least(&gw, 3).await, 3);
}

/// A client that sends `Expect: 100-continue` and waits for `100 Continue`
/// before its body (as curl does for a large upload) gets it from the own
/// loop once the request is allowed and its body wanted, and the body then
/// streams through; a denied request gets its answer without `100
/// Continue`. The differential cases send the body after a pause whatever
/// came; this client sends nothing until it is told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_for_100_continue_is_told_to_send_its_body() {
    let up = upstream().await;
    let (addr, gw, _dir) = gateway(up, &[], true).await;
    let t = token();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    for len in [5, 50_000] {
        let head = format!(
            "POST {M} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\ncontent-length: {len}\r\nexpect: 100-continue\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("write");
        let got = read_until(&mut s, b"\r\n\r\n").await;
        assert_eq!(got, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(&vec![b'z'; len]).await.expect("write");
        // The echo upstream's answer, read whole by its length, ends with
        // the body it received, after the head it received: without the
        // expectation, which the gateway answered itself.
        let got = read_until_done(&mut s, whole_answer).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with(&"z".repeat(len)), "{text}");
        assert!(
            text.contains("\r\nx-airbrx-tenant: acme-prod\r\n"),
            "{text}"
        );
        assert!(!text.to_ascii_lowercase().contains("\r\nexpect:"), "{text}");
    }
    // Denied: the answer alone, and the connection ends (the body, never
    // sent, is not waited for).
    let head = format!(
        "POST /v1/tenants/globex-web/markers HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403 "), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    // All three by the own loop.
    assert_eq!(served_at_least(&gw, 3).await, 3);
}

/// After an answer that came before the request's body (a denial), the
/// rest of the body is dropped as hyper's server drops it: what is at hand
/// then. A rest still to come is not waited for: the connection ends, and
/// what the client sends after is not read as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_of_a_body_an_answer_came_before_is_not_waited_for() {
    let up = upstream().await;
    let (addr, _gw, _dir) = gateway(up, &[], true).await;
    let denied = "/v1/tenants/globex-web/markers";
    for (first, whole) in [(0, 5), (3, 5), (20_000, 40_000)] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        start_post(&mut s, denied, first, whole, b'y').await;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0) | Err(_)) => break true,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        };
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 403 "), "{first}/{whole}: {text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
        assert!(closed, "{first}/{whole}: still open");
    }
}

/// The other side of the test above: a rest that is all at hand once the
/// answer is written, though not all read yet, is dropped, and the
/// connection goes on, as with hyper's server (its
/// `poll_drain_or_close_read` reads once too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_of_a_body_at_hand_is_dropped_and_the_connection_goes_on() {
    let up = upstream().await;
    let t = token();
    for fast in [true, false] {
        let (addr, gw, _dir) = gateway(up, &[], fast).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // The body goes with its head, without waiting for `100 Continue`
        // (a client may): more than the connection's first read takes.
        let head = format!(
            "POST /v1/tenants/globex-web/markers HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {t}\r\ncontent-length: 3000\r\nexpect: 100-continue\r\n\r\n"
        );
        s.write_all(&[head.as_bytes(), &[b'q'; 3000][..]].concat())
            .await
            .expect("write");
        let got = read_until_done(&mut s, whole_answer).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 403 "), "{fast}: {text}");
        assert!(!text.contains("100 Continue"), "{fast}: {text}");
        // The next request on the same connection is read as one.
        s.write_all(&get(M, &t, "")).await.expect("write");
        let got = read_until_done(&mut s, whole_answer).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{fast}: {text}");
        // Both by the own loop when it is on (counted as the connection
        // ends).
        drop(s);
        let want = if fast { 2 } else { 0 };
        assert_eq!(served_at_least(&gw, want).await, want);
    }
}

/// A client that goes away mid-body cancels the request, and an upstream
/// that answers before the body has all come ends the feeding: either
/// way the upstream is not left waiting for the rest, its connection is
/// closed (the body ends in an error for hyper's client, never as a short
/// body that looks whole, and never stays open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_off_does_not_leave_the_upstream_waiting() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up = listener.local_addr().expect("addr");
    // How many body bytes the upstream got before its connection ended.
    let (ended, mut got_at_end) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let (started, mut head_seen) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (ended, started) = (ended.clone(), started.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = vec![0u8; 65536];
                let mut told = false;
                loop {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    if !told && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        told = true;
                        let _ = started.send(());
                        // Answered at once, before the body.
                        if buf.starts_with(b"POST /v1/tenants/acme-prod/markers?early ") {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                                .await;
                        }
                    }
                }
                let end = buf
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(0, |i| i + 4);
                let _ = ended.send(buf.len() - end);
            });
        }
    });
    let (addr, _gw, _dir) = gateway(up, &[], true).await;
    for (early, first, whole) in [
        (false, 2, 5),
        (false, 10_000, 40_000),
        (true, 2, 5),
        (true, 10_000, 40_000),
    ] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let target = if early {
            format!("{M}?early")
        } else {
            M.to_string()
        };
        start_post(&mut s, &target, first, whole, b'z').await;
        tokio::time::timeout(Duration::from_secs(5), head_seen.recv())
            .await
            .expect("the head went on")
            .expect("upstream");
        if early {
            // The answer comes through; the client keeps its end open.
            read_until(&mut s, b"early").await;
        } else {
            drop(s);
        }
        let got = tokio::time::timeout(Duration::from_secs(5), got_at_end.recv())
            .await
            .unwrap_or_else(|_| panic!("{first}/{whole}: the upstream's connection was left open"))
            .expect("upstream");
        assert!(
            got <= first,
            "{first}/{whole}: the upstream got {got} bytes"
        );
    }
}
