//! The per-request decision: path check, route match, authentication and
//! authorization against one snapshot — everything before forwarding.
//!
//! Scales: routes 10 → 10,000 and PAT records 10 → 1,000,000; the decision
//! should stay flat. Baseline in the same run: the SHA-256 of one PAT, the
//! irreducible cost of a PAT lookup, so results read as ratios.

use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use scopegate::config::{self, Snapshot};
use scopegate::scope::{CubeSpec, Strictness};
use scopegate::token::pat::{self, PatRecord};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A snapshot with `routes` routes (tags t0..t49) and `pats` PAT records;
/// returns it and the secret of one record that admits the request.
fn snapshot(routes: usize, pats: usize) -> (Snapshot, String) {
    let mut y = String::from(
        "listen: { addr: \"127.0.0.1:0\" }\nupstream: { url: \"http://127.0.0.1:9\" }\n",
    );
    let _ = write!(
        y,
        "tokens:\n  jwt:\n    issuer: iss\n    audience: aud\n    keys:\n      - {{ kid: es, alg: ES256, public_key: {} }}\n",
        fixture("es256.pub.pem").display()
    );
    y.push_str("plans:\n  pro:\n    - { tags: [\"*\"], methods: [\"*\"] }\naccounts:\n  acme: { plan: pro }\ntenants:\n");
    for t in 0..100 {
        let _ = writeln!(y, "  tenant-{t}: {{ account: acme }}");
    }
    y.push_str("routes:\n");
    for r in 0..routes {
        let _ = writeln!(
            y,
            "  - {{ path: \"/v1/tenants/{{tenant}}/r{r}/{{id}}\", tag: t{}, methods: [GET, POST] }}",
            r % 50
        );
    }
    let mut snap =
        config::from_yaml(&y, Path::new("/bench/gateway.yaml"), &|_: &str| None).expect("config");
    let cube = CubeSpec {
        methods: vec!["GET".into()],
        tags: vec!["t7".into()],
        tenants: vec!["tenant-42".into()],
        accounts: vec!["acme".into()],
        ..Default::default()
    }
    .compile(&snap.vocabulary(), Strictness::Config)
    .expect("cube");
    let mut store = pat::PatStore::with_capacity(pats);
    let mut secret = String::new();
    for i in 0..pats {
        let s = pat::mint().expect("random");
        store.insert(
            pat::hash(&s),
            PatRecord {
                id: format!("tok_{i}").into(),
                expires: None,
                disabled: false,
                cubes: vec![cube.clone()].into_boxed_slice(),
            },
        );
        if i == pats / 2 {
            secret = s;
        }
    }
    snap.pats = store;
    (snap, secret)
}

fn es256_token() -> String {
    let key = EncodingKey::from_ec_pem(&std::fs::read(fixture("es256.key.pem")).expect("key"))
        .expect("key");
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("es".into());
    let claims = serde_json::json!({
        "iss": "iss", "aud": "aud", "sub": "svc", "jti": "j1", "exp": 4_000_000_000u64,
        "cube": {"methods": ["GET"], "tags": ["t7"], "tenants": ["tenant-42"], "accounts": ["acme"]}
    });
    jsonwebtoken::encode(&h, &claims, &key).expect("sign")
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    h
}

const PATH: &str = "/v1/tenants/tenant-42/r7/item-1";

/// The measured call: the whole decision for one request.
fn decide(
    snap: &Snapshot,
    headers: &HeaderMap,
    now: i64,
) -> Result<bool, scopegate::error::Reason> {
    scopegate::decision::decide(
        black_box(snap),
        &Method::GET,
        black_box(PATH),
        black_box(headers),
        now,
    )
    .verdict
}

fn bench(c: &mut Criterion) {
    let now = 1_900_000_000;
    let mut g = c.benchmark_group("decision");

    let (snap, secret) = snapshot(10, 10);
    g.bench_function("baseline: sha256 of one PAT", |b| {
        b.iter(|| pat::hash(black_box(&secret)))
    });

    for (routes, pats) in [(10, 10), (10_000, 10), (10, 1_000_000), (10_000, 1_000_000)] {
        let (snap, secret) = snapshot(routes, pats);
        let headers = bearer(&secret);
        let out = scopegate::decision::decide(&snap, &Method::GET, PATH, &headers, now);
        assert_eq!(
            out.verdict,
            Ok(true),
            "the benchmarked request must be allowed"
        );
        g.bench_with_input(
            BenchmarkId::new("PAT allow", format!("{routes} routes, {pats} PATs")),
            &(),
            |b, _| b.iter(|| decide(&snap, &headers, now)),
        );
    }

    let jwt = es256_token();
    g.bench_function("part: sha256 of the JWT", |b| {
        b.iter(|| pat::hash(black_box(&jwt)))
    });
    let headers = bearer(&jwt);
    g.bench_function("part: bearer() on the JWT header", |b| {
        b.iter(|| scopegate::token::bearer(black_box(&headers)).map(str::len))
    });
    let out = scopegate::decision::decide(&snap, &Method::GET, PATH, &headers, now);
    assert_eq!(out.verdict, Ok(true), "the benchmarked JWT must be allowed");
    g.bench_function("ES256 JWT allow, 10 routes, cached", |b| {
        b.iter(|| decide(&snap, &headers, now))
    });
    // The usage book, as the proxy feeds it after an allow: a warm entry
    // (the common case: a token calling a shape it called before).
    let book = scopegate::usage::UsageBook::new(10_000, 256);
    let (psnap, psecret) = snapshot(10, 10);
    let pheaders = bearer(&psecret);
    let out = scopegate::decision::decide(&psnap, &Method::GET, PATH, &pheaders, now);
    let (Some(principal), Some(m)) = (out.principal.as_ref(), out.matched) else {
        panic!("the benchmarked PAT request must be allowed");
    };
    let names = m.names(&psnap);
    book.record(principal, &Method::GET, &names, &psnap, 1, now);
    g.bench_function("part: usage record (warm)", |b| {
        b.iter(|| {
            book.record(
                black_box(principal),
                &Method::GET,
                black_box(&names),
                &psnap,
                1,
                now,
            )
        })
    });

    // A busy service token: 256 shapes kept (the default `max_calls`),
    // one per tenant it called. Calling the last one kept, and calling a
    // 257th that no longer fits (counted as dropped), as a token spread
    // over many tenants does on every request.
    let tenants: Vec<String> = (0..257).map(|i| format!("tenant-{i}")).collect();
    fn shape<'a>(
        names: &scopegate::decision::Names<'a>,
        tenant: &'a str,
    ) -> scopegate::decision::Names<'a> {
        scopegate::decision::Names {
            tenant: Some(tenant),
            ..*names
        }
    }
    let busy = scopegate::usage::UsageBook::new(10_000, 256);
    for t in &tenants[..256] {
        busy.record(principal, &Method::GET, &shape(&names, t), &psnap, 1, now);
    }
    for (case, tenant) in [("the last", &tenants[255]), ("one more", &tenants[256])] {
        let call = shape(&names, tenant);
        g.bench_function(format!("part: usage record (256 shapes, {case})"), |b| {
            b.iter(|| {
                busy.record(
                    black_box(principal),
                    &Method::GET,
                    black_box(&call),
                    &psnap,
                    1,
                    now,
                )
            })
        });
    }

    let (mut uncached, _) = snapshot(10, 10);
    uncached.jwt.cache = None;
    g.bench_function("ES256 JWT allow, 10 routes, no cache", |b| {
        b.iter(|| decide(&uncached, &headers, now))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
