//! What each token actually used, and the smallest cube that covers it
//! (issue "least privilege": `GET /tokens/{id}/usage`, `scopegate suggest`).
//!
//! Owns a bounded in-memory book: at most `max_tokens` token ids (least
//! recently used dropped first), each with at most `max_calls` distinct
//! (method, route, tenant, account) entries and a count of what did not
//! fit. Only allowed requests are recorded, by token *id* — never the token.
//! The token's own cubes are kept as names, rendered once per generation.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Snapshot;
use crate::decision::Names;
use crate::scope::{Cube, CubeSpec, IdSet};
use crate::token::{Principal, TokenKind};

/// One distinct call shape and how often it was seen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    pub route: String,
    pub tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub count: u64,
    /// RFC 3339.
    pub last_seen: String,
}

/// A call shape as kept: the time as Unix seconds, formatted only when a
/// report is asked for (the request path does not format dates).
#[derive(Debug, Clone)]
struct Shape {
    call: Call,
    last_unix: i64,
}

#[derive(Debug)]
struct TokenUsage {
    kind: TokenKind,
    calls: Vec<Shape>,
    /// Calls not recorded because `max_calls` shapes were already kept.
    dropped: u64,
    /// The token's cubes as names, and the generation they were rendered in.
    cubes: Option<(u64, Vec<CubeSpec>)>,
    /// Where a kept shape is in `calls`, by the hash of its method, route,
    /// tenant and account: a token that calls many tenants finds its shape
    /// in one lookup, not a scan of up to `max_calls` (benches/decision.rs:
    /// 256 shapes took 21x a single one scanned). Two shapes with the same
    /// hash keep the first's place; the other is found by a scan.
    index: HashMap<u64, usize, foldhash::fast::RandomState>,
}

/// What `GET /tokens/{id}/usage` returns (and `suggest` reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub token_id: String,
    pub kind: String,
    /// The token's cubes at its last use (or from the PAT file).
    pub cubes: Option<Vec<CubeSpec>>,
    pub calls: Vec<Call>,
    pub dropped: u64,
}

/// Up to this many kept shapes, a token's shape is found by comparing
/// names rather than through the index.
const SCAN_SHAPES: usize = 8;

/// `S` hashes a call shape; the unit tests give one that makes every
/// shape collide.
pub struct UsageBook<S = foldhash::fast::RandomState> {
    tokens: quick_cache::sync::Cache<Box<str>, Arc<Mutex<TokenUsage>>>,
    max_calls: usize,
    /// Keys are config names (route, tenant, account) and a method the
    /// route allowed: a fast seeded hash, no client-chosen bytes to flood.
    shapes: S,
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A compiled cube back to names, against the snapshot it was compiled in.
pub fn describe(cube: &Cube, snap: &Snapshot) -> CubeSpec {
    let names = |set: &IdSet, name: &dyn Fn(u32) -> Option<String>| -> Vec<String> {
        match set {
            IdSet::Any => vec!["*".to_string()],
            IdSet::None => Vec::new(),
            IdSet::One(id) => name(*id).into_iter().collect(),
            IdSet::Many(ids) => ids.iter().filter_map(|id| name(*id)).collect(),
        }
    };
    CubeSpec {
        methods: cube.methods.names().map(str::to_string).collect(),
        tags: names(&cube.tags, &|id| {
            snap.tags.get(id as usize).map(|t| t.to_string())
        }),
        paths: names(&cube.routes, &|id| {
            snap.routes.get(id).map(|r| r.template.to_string())
        }),
        tenants: names(&cube.tenants, &|id| {
            snap.tenants.get(id as usize).map(|t| t.name.to_string())
        }),
        accounts: names(&cube.accounts, &|id| {
            snap.accounts.get(id as usize).map(|a| a.name.to_string())
        }),
        role: None,
    }
}

impl UsageBook {
    pub fn new(max_tokens: usize, max_calls: usize) -> UsageBook {
        UsageBook::with_hasher(max_tokens, max_calls, Default::default())
    }
}

impl<S: BuildHasher> UsageBook<S> {
    fn with_hasher(max_tokens: usize, max_calls: usize, shapes: S) -> UsageBook<S> {
        UsageBook {
            tokens: quick_cache::sync::Cache::new(max_tokens.max(1)),
            max_calls,
            shapes,
        }
    }

    /// Record one allowed request.
    pub fn record(
        &self,
        principal: &Principal<'_>,
        method: &http::Method,
        names: &Names<'_>,
        snap: &Snapshot,
        generation: u64,
        now: i64,
    ) {
        let Some(tag) = names.tag else { return };
        let id = principal.token_id();
        let entry = match self.tokens.get(id) {
            Some(e) => e,
            None => {
                let e = Arc::new(Mutex::new(TokenUsage {
                    kind: principal.kind(),
                    calls: Vec::new(),
                    dropped: 0,
                    cubes: None,
                    index: HashMap::default(),
                }));
                self.tokens.insert(id.into(), e.clone());
                e
            }
        };
        let Ok(mut u) = entry.lock() else { return };
        if u.cubes.as_ref().is_none_or(|(g, _)| *g != generation) {
            let cubes = principal
                .cubes()
                .iter()
                .map(|c| describe(c, snap))
                .collect();
            u.cubes = Some((generation, cubes));
        }
        let m = method.as_str();
        let u = &mut *u;
        let key = || {
            self.shapes
                .hash_one((m, names.route, names.tenant, names.account))
        };
        let same = |s: &Shape| {
            let c = &s.call;
            c.method == m
                && c.route == names.route
                && c.tenant.as_deref() == names.tenant
                && c.account.as_deref() == names.account
        };
        // A few shapes are scanned: hashing the four names costs more than
        // comparing them. With the index alone a kept-alive PAT request
        // took 1.1% more instructions (bench/instructions.sh) and a
        // one-shape record 46.5 ns against 33.7 scanned (criterion,
        // interleaved). The index is kept whole all the same, for when
        // there are more.
        let found = if u.calls.len() <= SCAN_SHAPES {
            u.calls.iter().position(same)
        } else {
            match u.index.get(&key()) {
                Some(&i) if u.calls.get(i).is_some_and(same) => Some(i),
                // Another shape with this hash holds the place.
                Some(_) => u.calls.iter().position(same),
                None => None,
            }
        };
        match found {
            Some(i) => {
                if let Some(s) = u.calls.get_mut(i) {
                    s.call.count += 1;
                    s.last_unix = now;
                }
            }
            None if u.calls.len() < self.max_calls => {
                u.index.entry(key()).or_insert(u.calls.len());
                u.calls.push(Shape {
                    call: Call {
                        method: m.to_string(),
                        route: names.route.to_string(),
                        tag: tag.to_string(),
                        tenant: names.tenant.map(str::to_string),
                        account: names.account.map(str::to_string),
                        count: 1,
                        last_seen: String::new(),
                    },
                    last_unix: now,
                });
            }
            None => u.dropped += 1,
        }
    }

    /// The report for `token_id`: what was recorded, or (for a PAT in the
    /// file that was never used) its cubes and no calls.
    pub fn report(&self, token_id: &str, snap: &Snapshot) -> Option<Report> {
        if let Some(e) = self.tokens.get(token_id)
            && let Ok(u) = e.lock()
        {
            return Some(Report {
                token_id: token_id.to_string(),
                kind: u.kind.as_str().to_string(),
                cubes: u.cubes.as_ref().map(|(_, c)| c.clone()),
                calls: u
                    .calls
                    .iter()
                    .map(|s| Call {
                        last_seen: rfc3339(
                            SystemTime::UNIX_EPOCH
                                + std::time::Duration::from_secs(
                                    u64::try_from(s.last_unix).unwrap_or(0),
                                ),
                        ),
                        ..s.call.clone()
                    })
                    .collect(),
                dropped: u.dropped,
            });
        }
        let record = snap.pats.find_by_id(token_id)?;
        Some(Report {
            token_id: token_id.to_string(),
            kind: "pat".into(),
            cubes: Some(record.cubes.iter().map(|c| describe(c, snap)).collect()),
            calls: Vec::new(),
            dropped: 0,
        })
    }
}

/// The smallest single cube covering every observed call, and what the
/// token's current cubes grant beyond it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Suggestion {
    /// Methods, tags, tenants and accounts that were used.
    pub cube: CubeSpec,
    /// Narrower still: the exact route templates instead of tags.
    pub paths: Vec<String>,
    /// Per axis, what the current cubes grant and was never used (`"*"`
    /// when a wildcard could become the list in `cube`).
    pub removable: CubeSpec,
}

fn sorted_unique(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// Compute the suggestion from a report.
pub fn suggest(report: &Report) -> Suggestion {
    let calls = &report.calls;
    // A GET grant covers HEAD: count HEAD as GET.
    let methods = sorted_unique(
        calls
            .iter()
            .map(|c| {
                if c.method == "HEAD" {
                    "GET".to_string()
                } else {
                    c.method.clone()
                }
            })
            .collect(),
    );
    let cube = CubeSpec {
        methods,
        tags: sorted_unique(calls.iter().map(|c| c.tag.clone()).collect()),
        tenants: sorted_unique(calls.iter().filter_map(|c| c.tenant.clone()).collect()),
        accounts: sorted_unique(calls.iter().filter_map(|c| c.account.clone()).collect()),
        ..CubeSpec::default()
    };
    let paths = sorted_unique(calls.iter().map(|c| c.route.clone()).collect());
    let current = report.cubes.clone().unwrap_or_default();
    let unused = |granted: Vec<String>, used: &[String]| -> Vec<String> {
        sorted_unique(
            granted
                .into_iter()
                .filter(|g| g == "*" || !used.contains(g))
                .collect(),
        )
    };
    let all = |f: fn(&CubeSpec) -> &Vec<String>| -> Vec<String> {
        current.iter().flat_map(|c| f(c).iter().cloned()).collect()
    };
    let removable = CubeSpec {
        methods: unused(all(|c| &c.methods), &cube.methods),
        tags: unused(all(|c| &c.tags), &cube.tags),
        paths: unused(all(|c| &c.paths), &paths),
        tenants: unused(all(|c| &c.tenants), &cube.tenants),
        accounts: unused(all(|c| &c.accounts), &cube.accounts),
        role: None,
    };
    Suggestion {
        cube,
        paths,
        removable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::MethodSet;
    use crate::token::introspect::Introspected;

    fn snapshot() -> Snapshot {
        crate::config::from_yaml(
            crate::config::TEST_CONFIG,
            std::path::Path::new("/etc/scopegate/gateway.yaml"),
            &|_| None,
        )
        .expect("a valid configuration")
    }

    fn token() -> Principal<'static> {
        token_with(MethodSet::ALL)
    }

    fn token_with(methods: MethodSet) -> Principal<'static> {
        Principal::Introspected(Arc::new(Introspected {
            token_id: "tok_busy".into(),
            subject: None,
            cubes: Box::new([Cube {
                methods,
                tags: IdSet::Any,
                routes: IdSet::Any,
                tenants: IdSet::Any,
                accounts: IdSet::Any,
            }]),
            exp: None,
        }))
    }

    /// A call of the rules route for `tenant`.
    fn rules_call(tenant: &str) -> Names<'_> {
        Names {
            route: "/v1/tenants/{tenant}/rules",
            tag: Some("rules"),
            tenant: Some(tenant),
            account: Some("acme"),
            plan: Some("pro"),
        }
    }

    /// Hashes every shape alike: each shape after the first shares the
    /// first's place in the index and is found by the scan behind it.
    #[derive(Default)]
    struct Collide;

    impl std::hash::Hasher for Collide {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    /// A kept shape as (method, tenant, count, last seen).
    type Kept = (String, Option<String>, u64, String);

    /// `before` shapes called once each (other tenants), then nine calls
    /// of five shapes with room for four more: the four kept after the
    /// first `before`, and the count dropped. Past [`SCAN_SHAPES`] kept,
    /// shapes are found through the index.
    fn book_after_calls<S: BuildHasher>(book: &UsageBook<S>, before: usize) -> (Vec<Kept>, u64) {
        let snap = snapshot();
        let others: Vec<String> = (0..before).map(|i| format!("other-{i}")).collect();
        for tenant in &others {
            book.record(
                &token(),
                &http::Method::GET,
                &rules_call(tenant),
                &snap,
                1,
                1,
            );
        }
        let calls = [
            ("GET", "t1", 10),
            ("GET", "t2", 11),
            ("POST", "t1", 12),
            ("GET", "t1", 13),
            ("GET", "t2", 14),
            ("GET", "t1", 15),
            ("DELETE", "t1", 16),
            // Past the four kept: dropped, while kept ones still count.
            ("PUT", "t1", 17),
            ("GET", "t2", 18),
        ];
        for (method, tenant, now) in calls {
            let method = http::Method::from_bytes(method.as_bytes()).expect("method");
            book.record(&token(), &method, &rules_call(tenant), &snap, 1, now);
        }
        let report = book.report("tok_busy", &snap).expect("recorded");
        assert_eq!(report.kind, "pat");
        let (first, rest) = report.calls.split_at(before);
        for (c, tenant) in first.iter().zip(&others) {
            assert_eq!((c.tenant.as_deref(), c.count), (Some(tenant.as_str()), 1));
        }
        let calls = rest
            .iter()
            .map(|c| {
                (
                    c.method.clone(),
                    c.tenant.clone(),
                    c.count,
                    c.last_seen.clone(),
                )
            })
            .collect();
        (calls, report.dropped)
    }

    #[test]
    fn shapes_are_counted_apart_with_or_without_hash_collisions() {
        let kept = |method: &str, tenant: &str, count, second: u8| -> Kept {
            let at = format!("1970-01-01T00:00:{second}Z");
            (method.into(), Some(tenant.into()), count, at)
        };
        let want = vec![
            kept("GET", "t1", 3, 15),
            kept("GET", "t2", 3, 18),
            kept("POST", "t1", 1, 12),
            kept("DELETE", "t1", 1, 16),
        ];
        // Scanned (a few kept), then through the index (many kept).
        for before in [0, SCAN_SHAPES] {
            let seeded = UsageBook::new(10, before + 4);
            assert_eq!(
                book_after_calls(&seeded, before),
                (want.clone(), 1),
                "{before}"
            );
            let colliding = UsageBook::with_hasher(
                10,
                before + 4,
                std::hash::BuildHasherDefault::<Collide>::default(),
            );
            assert_eq!(
                book_after_calls(&colliding, before),
                (want.clone(), 1),
                "{before}"
            );
        }
    }

    /// The token's cubes are rendered again when a new generation serves
    /// it (a reload may have changed them), and only then.
    #[test]
    fn a_new_generation_renders_the_cubes_again() {
        let snap = snapshot();
        let book = UsageBook::new(10, 4);
        let names = rules_call("acme-prod");
        let methods = |book: &UsageBook| -> Vec<Vec<String>> {
            let report = book.report("tok_busy", &snap).expect("recorded");
            report
                .cubes
                .expect("cubes")
                .into_iter()
                .map(|c| c.methods)
                .collect()
        };
        let all = token();
        let get = token_with(MethodSet::GET);
        book.record(&all, &http::Method::GET, &names, &snap, 1, 10);
        let wide = methods(&book);
        assert_eq!(wide.len(), 1);
        assert!(wide[0].len() > 1, "{wide:?}");
        // The same generation keeps what it rendered.
        book.record(&get, &http::Method::GET, &names, &snap, 1, 11);
        assert_eq!(methods(&book), wide);
        book.record(&get, &http::Method::GET, &names, &snap, 2, 12);
        assert_eq!(methods(&book), [["GET"]]);
    }
}
