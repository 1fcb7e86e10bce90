//! The properties scopegate must hold for *any* input, written once and
//! run two ways: by proptest on stable in `cargo test` (tests/properties.rs)
//! and by libFuzzer under `fuzz/` (each target includes this file with
//! `#[path]`). Every check panics on a violation, which is how both tools
//! report a finding.
//!
//! Nothing here may use `unwrap` on the input side: a panic must mean a
//! broken property, never a broken check.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::LazyLock;

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method};
use scopegate::Snapshot;
use scopegate::decision::decide;
use scopegate::path::canonicalize;
use scopegate::token::{self, bearer, pat};

/// An HMAC secret for the properties' own HS256 key (not a real secret).
pub const HS_SECRET: &str = "properties-hs256-secret-0123456789abcdef";
/// Fixed clock: 2026-01-01T00:00:00Z.
pub const NOW: i64 = 1_767_225_600;

const CONFIG: &str = r#"
listen: { addr: "127.0.0.1:0" }
upstream: { url: "http://127.0.0.1:9" }
tokens:
  pat_file: tokens.yaml
  jwt:
    issuer: https://auth.props.example
    audience: airbrx-api
    leeway: 30s
    keys:
      - { kid: hs, alg: HS256, secret_env: PROPS_HS256 }
plans:
  free:
    - { tags: [markers], methods: [GET] }
  pro:
    - { tags: ["*"], methods: ["*"] }
accounts:
  acme: { plan: pro }
  globex: { plan: free }
tenants:
  acme-prod: { account: acme }
  globex-web: { account: globex }
routes:
  - { path: /v1/health, public: true }
  - { path: "/v1/tenants/{tenant}/analytics/{*rest}", tag: analytics, methods: [GET] }
  - { path: "/v1/tenants/{tenant}/rules", tag: rules, methods: [GET, POST] }
  - { path: "/v1/tenants/{tenant}/rules/{rule_id}", tag: rules, methods: [GET, PUT, DELETE] }
  - { path: "/v1/tenants/{tenant}/markers", tag: markers, methods: [GET, POST] }
  - { path: "/v1/accounts/{account}", tag: accounts, methods: [GET, PUT] }
  - { path: "/v1/accounts/{account}/tenants/{tenant}/settings", tag: accounts, methods: [GET] }
"#;

/// A configuration, a PAT and a JWT that are valid for it, shared by every
/// check (built once per process).
pub struct World {
    pub snap: Snapshot,
    pub pat: String,
    pub jwt: String,
    pub dir: PathBuf,
}

pub static WORLD: LazyLock<World> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("scopegate-props-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let pat = pat::mint().expect("random");
    let cube =
        "{ methods: [GET, POST], tags: [markers, rules], tenants: [acme-prod], accounts: [acme] }";
    std::fs::write(
        dir.join("tokens.yaml"),
        format!(
            "tokens:\n  - id: tok_props\n    sha256: {}\n    cube: {cube}\n",
            hex::encode(pat::hash(&pat))
        ),
    )
    .expect("write tokens");
    let env = |name: &str| (name == "PROPS_HS256").then(|| HS_SECRET.to_string());
    let snap = scopegate::config::from_yaml(CONFIG, &dir.join("gateway.yaml"), &env)
        .expect("the properties' configuration loads");
    let jwt = sign_hs256(
        br#"{"alg":"HS256","kid":"hs","typ":"JWT"}"#,
        serde_json::json!({
            "iss": "https://auth.props.example", "aud": "airbrx-api", "sub": "u", "jti": "j",
            "exp": NOW + 3600,
            "cube": {"methods": ["GET"], "tags": ["*"], "tenants": ["acme-prod", "globex-web"], "accounts": ["*"]}
        })
        .to_string()
        .as_bytes(),
    );
    World {
        snap,
        pat,
        jwt,
        dir,
    }
});

/// A compact JWS over `header` and `payload` (raw bytes, base64url-encoded
/// here), signed with the properties' HS256 key.
pub fn sign_hs256(header: &[u8], payload: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!("{}.{}", b64.encode(header), b64.encode(payload));
    let key = jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes());
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
        .expect("HMAC signing cannot fail");
    format!("{message}.{sig}")
}

// ---------------------------------------------------------------------------
// Paths (SPEC §6 step 1)

/// The shapes SPEC §6 rejects, looked for in a canonical path.
pub fn rejected_shape(p: &str) -> Option<&'static str> {
    if !p.starts_with('/') {
        return Some("not absolute");
    }
    if p.contains('\\') {
        return Some("backslash");
    }
    if p.bytes().any(|b| b < 0x20 || b == 0x7f || b >= 0x80) {
        return Some("control or non-ASCII byte");
    }
    let lower = p.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%00", "%2e"] {
        if lower.contains(bad) {
            return Some("encoded separator, NUL or dot");
        }
    }
    let segments: Vec<&str> = p[1..].split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() && i + 1 != segments.len() {
            return Some("empty segment");
        }
        let name = seg.split(';').next().unwrap_or(seg);
        if name == "." || name == ".." {
            return Some("dot segment");
        }
    }
    None
}

/// For any string: no panic; an accepted path is free of every rejected
/// shape, canonical (a second pass returns it unchanged), and the path
/// forwarded matches the same route with the same tenant and account as the
/// path checked.
pub fn path(raw: &str) {
    let Ok(checked) = canonicalize(raw) else {
        return;
    };
    if let Some(shape) = rejected_shape(&checked) {
        panic!("{raw:?} was accepted as {checked:?}, which has a {shape}");
    }
    let again = canonicalize(&checked)
        .unwrap_or_else(|e| panic!("canonical {checked:?} refused on a second pass: {e:?}"));
    assert_eq!(again, checked, "canonicalize is not idempotent on {raw:?}");
    let routes = &WORLD.snap.routes;
    let a = routes.at(&checked).map(|m| (m.id, m.tenant, m.account));
    let b = routes.at(&again).map(|m| (m.id, m.tenant, m.account));
    assert_eq!(a, b, "{raw:?}: the forwarded path matches differently");
}

// ---------------------------------------------------------------------------
// Tokens (SPEC §4, §6 step 3)

/// For any `Authorization` value: no panic; a token is returned only if it
/// is a trimmed, bounded b64token that was in the value after `Bearer `; a
/// PAT-shaped one authenticates only when it is the known PAT.
pub fn bearer_value(value: &[u8]) {
    let Ok(v) = HeaderValue::from_bytes(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, v);
    let Ok(tok) = bearer(&headers) else {
        return;
    };
    assert!(!tok.is_empty() && tok.len() <= token::MAX_TOKEN_LEN);
    assert!(
        value.len() > 7 && value[..6].eq_ignore_ascii_case(b"bearer") && value[6] == b' ',
        "a token was read from a value that does not start with `Bearer `: {value:?}"
    );
    let body = tok.trim_end_matches('=');
    assert!(
        body.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)),
        "{tok:?} is not a b64token"
    );
    let authenticated = scopegate::decision::authenticate(&WORLD.snap, &headers, NOW);
    if tok.starts_with(pat::PREFIX) && tok != WORLD.pat {
        assert!(authenticated.is_err(), "an unknown PAT authenticated");
    }
}

/// For any token string: verification never panics, gives the same answer
/// twice (the second from the cache when the first succeeded), and only the
/// known JWT or one signed with the configured key can succeed.
pub fn jwt_token(tok: &str) {
    let jwt = &WORLD.snap.jwt;
    let vocab = WORLD.snap.vocabulary();
    let first = jwt
        .authenticate(tok, NOW, &vocab)
        .map(|p| p.token_id().to_string());
    let second = jwt
        .authenticate(tok, NOW, &vocab)
        .map(|p| p.token_id().to_string());
    assert_eq!(first, second, "the cache changed the answer for {tok:?}");
    if first.is_ok() && tok != WORLD.jwt {
        // Only possible if the fuzzer forged an HMAC: check it really verifies.
        let (msg, sig) = tok.rsplit_once('.').expect("three parts");
        let key = jsonwebtoken::DecodingKey::from_secret(HS_SECRET.as_bytes());
        assert!(
            jsonwebtoken::crypto::verify(sig, msg.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
                .unwrap_or(false),
            "{tok:?} authenticated without a valid signature"
        );
    }
}

/// For any header and payload bytes, *validly signed*: claims parsing never
/// panics, and an accepted token really has a numeric `exp` not past the
/// leeway, `nbf`/`iat` not ahead of it, the configured `iss` and `aud`, and
/// exactly one of `cube`/`cubes` — checked here independently of the
/// verifier, from the raw JSON.
pub fn signed_claims(header: &[u8], payload: &[u8]) {
    let tok = sign_hs256(header, payload);
    let vocab = WORLD.snap.vocabulary();
    let result = WORLD.snap.jwt.authenticate(&tok, NOW, &vocab);
    let Ok(principal) = result else {
        return;
    };
    let h: serde_json::Value = serde_json::from_slice(header).expect("accepted header is JSON");
    assert_eq!(h["alg"], "HS256", "accepted with alg {}", h["alg"]);
    assert_eq!(h["kid"], "hs");
    assert!(h.get("crit").is_none(), "accepted a crit header");
    let c: serde_json::Value = serde_json::from_slice(payload).expect("accepted claims are JSON");
    let now = NOW as f64;
    let leeway = 30.0;
    let exp = c["exp"].as_f64().expect("accepted without a numeric exp");
    assert!(now < exp + leeway, "accepted after exp");
    for k in ["nbf", "iat"] {
        if let Some(t) = c.get(k).and_then(serde_json::Value::as_f64) {
            assert!(t <= now + leeway, "accepted before {k}");
        }
    }
    assert_eq!(c["iss"], "https://auth.props.example");
    let aud_ok = match &c["aud"] {
        serde_json::Value::String(a) => a == "airbrx-api",
        serde_json::Value::Array(list) => list.iter().any(|a| a == "airbrx-api"),
        _ => false,
    };
    assert!(aud_ok, "accepted with aud {}", c["aud"]);
    let sources = ["cube", "cubes", "scope"]
        .iter()
        .filter(|k| c.get(**k).is_some())
        .count();
    assert_eq!(
        sources, 1,
        "accepted without exactly one of cube/cubes/scope"
    );
    let id = principal.token_id();
    assert!(token::is_safe_identity(id), "unsafe token id {id:?}");
}

// ---------------------------------------------------------------------------
// The whole decision (SPEC §6)

/// For any method, path and `Authorization` value (or one of the world's
/// valid tokens): `decide` never panics; an allowed request has a canonical
/// path, a matched route and a principal one of whose cubes names the
/// route's tenant; and deciding the forwarded path gives the same verdict.
pub fn decision(method: &[u8], raw_path: &str, auth: Auth<'_>) {
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let mut headers = HeaderMap::new();
    let value = match auth {
        Auth::None => None,
        Auth::Pat => HeaderValue::from_str(&format!("Bearer {}", WORLD.pat)).ok(),
        Auth::Jwt => HeaderValue::from_str(&format!("Bearer {}", WORLD.jwt)).ok(),
        Auth::Raw(b) => HeaderValue::from_bytes(b).ok(),
    };
    if let Some(v) = value {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let snap = &WORLD.snap;
    let out = decide(snap, &method, raw_path, &headers, NOW);
    let verdict = out.verdict;
    let Some(path) = out.path.as_deref() else {
        assert!(verdict.is_err(), "{raw_path:?} decided without a path");
        return;
    };
    if verdict == Ok(true) {
        assert_eq!(rejected_shape(path), None, "allowed {raw_path:?}");
        let m = out.matched.expect("allowed without a route");
        let p = out.principal.as_ref().expect("allowed without a principal");
        if let Some(t) = m.tenant {
            assert!(
                p.cubes().iter().any(|c| c.tenants.contains(t)),
                "allowed {raw_path:?} on a tenant no cube names"
            );
        }
    }
    let forwarded = path.to_string();
    let again = decide(snap, &method, &forwarded, &headers, NOW).verdict;
    assert_eq!(
        verdict, again,
        "{raw_path:?} and its forwarded form {forwarded:?} decide differently"
    );
}

/// Which `Authorization` a decision input carries.
pub enum Auth<'a> {
    None,
    Pat,
    Jwt,
    Raw(&'a [u8]),
}

// ---------------------------------------------------------------------------
// Configuration (SPEC §3)

/// For any gateway.yaml text: loading never panics; every error names the
/// file; and a configuration that loads never carries the env secret in its
/// `Debug` form (which is what `check` and logs could print).
pub fn config(text: &str) {
    let file = WORLD.dir.join("gateway.yaml");
    let env = |name: &str| (name == "PROPS_HS256").then(|| HS_SECRET.to_string());
    match scopegate::config::from_yaml(text, &file, &env) {
        Ok(snap) => {
            let shown = format!("{snap:?}");
            assert!(
                !shown.contains(HS_SECRET),
                "a secret in the snapshot's Debug"
            );
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without a problem");
            for e in &errors.0 {
                let shown = e.to_string();
                assert!(
                    shown.contains(&*file.to_string_lossy())
                        || shown.contains(&*WORLD.dir.to_string_lossy()),
                    "an error that does not name its file: {shown}"
                );
                assert!(!shown.contains(HS_SECRET), "a secret in an error: {shown}");
            }
        }
    }
}

/// For any PAT file text: the chunked parser agrees with serde_yaml on the
/// whole document, for chunks of 1, 2 and 7 records.
pub fn pat_file(text: &str) {
    if text.trim_start().starts_with('{') {
        // JSON takes serde_json; its equivalence is not this property.
        return;
    }
    let vocab = WORLD.snap.vocabulary();
    for per_chunk in [1, 2, 7] {
        let (chunked, whole) = scopegate::config::pat_file_both_ways(text, per_chunk, &vocab);
        assert_eq!(chunked, whole, "chunks of {per_chunk} disagree on {text:?}");
    }
}

/// The in-future upstream client's response-head parser (src/h1.rs) on any
/// bytes: never panics; a final head lies within the input; the framing it
/// reports is what the headers say; only HTTP/1.1 answers with a delimited
/// body are kept alive.
pub fn h1_head(input: &[u8], head_request: bool) {
    use scopegate::h1::{Framing, Parsed, parse_head};
    let buf = bytes::Bytes::copy_from_slice(input);
    let Ok(Parsed::Final(head, n)) = parse_head(&buf, head_request) else {
        if let Ok(Parsed::Interim(n)) = parse_head(&buf, head_request) {
            assert!(n > 0 && n <= input.len());
        }
        return;
    };
    assert!(n <= input.len() && n <= scopegate::h1::MAX_HEAD);
    let cl = head.headers.contains_key(http::header::CONTENT_LENGTH);
    let te = head.headers.contains_key(http::header::TRANSFER_ENCODING);
    assert!(!(cl && te), "TE with CL accepted");
    match head.framing {
        Framing::Empty => assert!(
            head_request || head.status == 204 || head.status == 304,
            "no body for {}",
            head.status
        ),
        Framing::Length(_) => assert!(cl),
        Framing::Chunked => assert!(te && head.version == http::Version::HTTP_11),
        Framing::Eof => assert!(!cl && !te && !head.keep_alive),
    }
    if head.keep_alive {
        assert_eq!(head.version, http::Version::HTTP_11);
    }
}

/// The listener's own HTTP/1 loop's head parser (src/server/fast.rs) on
/// any bytes: it either takes one whole head and leaves exactly the bytes
/// after it (and after its body when the body is taken whole; a body over
/// [`MAX_BODY`](scopegate::server::MAX_BODY) is streamed, its bytes left
/// first), or leaves every byte where it was, because hyper reads those
/// bytes next. A head it takes is one httparse takes whole, HTTP/1.1 and
/// not HEAD, and the request has httparse's method, the target as `Uri`
/// (and so hyper) reads it, and every field's values in order.
pub fn fast_h1_head(input: &[u8]) {
    use scopegate::server::{ParsedHead, parse_head};
    let mut buf = bytes::BytesMut::from(input);
    let parsed = parse_head(&mut buf, 8192);
    let mut hs = [httparse::EMPTY_HEADER; 100];
    let mut r = httparse::Request::new(&mut hs);
    let whole = r.parse(input);
    // The body's length as its one `Content-Length` field says, digits
    // only, when httparse takes the head whole.
    let length = |r: &httparse::Request<'_, '_>| -> usize {
        let mut values = r
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| {
                std::str::from_utf8(h.value)
                    .expect("digits")
                    .parse::<usize>()
                    .expect("digits")
            });
        let n = values.next().unwrap_or(0);
        assert!(values.next().is_none(), "one length at most");
        n
    };
    let (req, streamed) = match parsed {
        ParsedHead::Request(req) => (req, None),
        ParsedHead::Stream(req, feed) => (req, Some(feed.left())),
        ParsedHead::Body(need) => {
            assert_eq!(&buf[..], input, "a short body leaves every byte");
            let Ok(httparse::Status::Complete(n)) = whole else {
                panic!("asked for a body after a head httparse does not take: {input:?}");
            };
            let l = length(&r);
            assert!(l > 0 && l <= scopegate::server::MAX_BODY);
            assert_eq!(need, n + l);
            assert!(need > input.len(), "asked for bytes it had");
            return;
        }
        _ => {
            assert_eq!(&buf[..], input, "a head not taken leaves every byte");
            return;
        }
    };
    let Ok(httparse::Status::Complete(n)) = whole else {
        panic!("served what httparse does not take whole: {input:?}");
    };
    assert!(n <= 8192);
    // The body is exactly the bytes its length says, and the bytes after
    // it stay; a streamed body's bytes all stay, for the loop to feed.
    let l = length(&r);
    // A non-empty HTTP/1.1 body that a `100 Continue` is expected for is
    // streamed whatever its size (`100 Continue` goes when it is wanted).
    let expects = r.version == Some(1)
        && l > 0
        && r.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("expect") && h.value.eq_ignore_ascii_case(b"100-continue")
        });
    if let Some(left) = streamed {
        assert!(
            l > scopegate::server::MAX_BODY || expects,
            "streamed a body of {l}"
        );
        assert_eq!(left, l as u64);
        assert!(
            matches!(req.body(), scopegate::proxy::RequestBody::Streamed(b) if b.left() == l as u64)
        );
        assert_eq!(&buf[..], &input[n..], "the body's bytes stay");
    } else {
        assert!(
            !expects,
            "a body that 100 Continue is expected for, not streamed"
        );
        let body = match req.body() {
            scopegate::proxy::RequestBody::Empty => &[][..],
            scopegate::proxy::RequestBody::Arrived(Some(b)) => &b[..],
            _ => panic!("a body of another kind"),
        };
        assert_eq!(body, &input[n..n + l], "the body");
        assert_eq!(&buf[..], &input[n + l..], "the bytes after the body stay");
    }
    // HTTP/1.1 or HTTP/1.0, as it came.
    match r.version {
        Some(1) => assert_eq!(req.version(), http::Version::HTTP_11),
        Some(0) => assert_eq!(req.version(), http::Version::HTTP_10),
        other => panic!("served version {other:?}"),
    }
    assert_eq!(Some(req.method().as_str()), r.method);
    assert_ne!(req.method(), Method::CONNECT);
    // The target as `Uri` reads it, as hyper reads it (a fragment, which
    // has no place in a request, is dropped by both; found by the fuzzer).
    let target = http::Uri::try_from(r.path.unwrap_or_default());
    assert_eq!(Some(req.uri()), target.as_ref().ok());
    // `Connection` is the loop's to take (one `close` or `keep-alive`):
    // hop-by-hop, it is not passed on.
    let connection = |n: &str| n.eq_ignore_ascii_case("connection");
    assert!(req.headers().get(http::header::CONNECTION).is_none());
    let passed = r.headers.iter().filter(|h| !connection(h.name)).count();
    assert_eq!(req.headers().len(), passed);
    // Every other name's values, in the order they came.
    for h in r.headers.iter().filter(|h| !connection(h.name)) {
        let want: Vec<&[u8]> = r
            .headers
            .iter()
            .filter(|o| o.name.eq_ignore_ascii_case(h.name))
            .map(|o| o.value)
            .collect();
        let got: Vec<&[u8]> = req
            .headers()
            .get_all(h.name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(got, want, "{}", h.name);
    }
}

/// The chunked decoder on any bytes: never panics, emits no more body
/// than it was given, and gives the same answer whatever the read
/// boundaries (all at once, byte by byte, in pieces of `step`).
pub fn h1_chunked(input: &[u8], step: usize) {
    let whole = dechunk(input, input.len().max(1));
    assert_eq!(
        whole,
        dechunk(input, 1),
        "byte by byte differs on {input:?}"
    );
    assert_eq!(
        whole,
        dechunk(input, step.max(1)),
        "steps of {step} differ on {input:?}"
    );
    if let Some(Ok((body, _, _))) = &whole {
        assert!(body.len() <= input.len());
    }
}

/// Body, trailers and bytes left after the end; `None` when more input
/// was needed.
type Dechunked = Option<Result<(Vec<u8>, Option<HeaderMap>, usize), scopegate::h1::H1Error>>;

fn dechunk(input: &[u8], step: usize) -> Dechunked {
    use scopegate::h1::{Chunked, Decoded};
    let mut dec = Chunked::default();
    let mut buf = bytes::BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        match dec.decode(&mut buf) {
            Err(e) => return Some(Err(e)),
            Ok(Decoded::Data(d)) => out.extend_from_slice(&d),
            Ok(Decoded::Trailers(t)) => {
                return Some(Ok((out, Some(t), buf.len() + input.len() - fed)));
            }
            Ok(Decoded::End) => return Some(Ok((out, None, buf.len() + input.len() - fed))),
            Ok(Decoded::NeedMore) => {
                if fed == input.len() {
                    return None;
                }
                let n = step.min(input.len() - fed);
                buf.extend_from_slice(&input[fed..fed + n]);
                fed += n;
            }
        }
    }
}

/// Any body, chunked at any boundaries, decodes to itself.
pub fn h1_chunked_roundtrip(body: &[u8], splits: &[usize], step: usize) {
    let mut enc = Vec::new();
    let mut at = 0;
    for s in splits.iter().copied().chain([body.len()]) {
        let end = (at + s).min(body.len());
        if end > at {
            enc.extend_from_slice(format!("{:x}\r\n", end - at).as_bytes());
            enc.extend_from_slice(&body[at..end]);
            enc.extend_from_slice(b"\r\n");
        }
        at = end;
    }
    enc.extend_from_slice(b"0\r\n\r\n");
    let got = dechunk(&enc, step.max(1));
    assert_eq!(got, Some(Ok((body.to_vec(), None, 0))), "{enc:?}");
}
