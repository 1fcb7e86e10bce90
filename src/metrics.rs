//! Prometheus metrics (SPEC §9).
//!
//! Owns the registry and every metric family named in the spec. Labels are
//! bounded: decisions, reasons and methods are fixed sets, tags come from the
//! operator's route table; token ids, paths and tenant ids are never labels.
//! Each gateway has its own registry, so tests running side by side do not
//! share counters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::sync::OnceLock;

use crate::error::Reason;

/// Tag label for requests denied before a route (and so a tag) is known.
pub const NO_TAG: &str = "none";
/// Tag label for public routes, which have no tag.
pub const PUBLIC_TAG: &str = "public";

/// Every family of SPEC §9.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub denials: IntCounterVec,
    pub request_duration: HistogramVec,
    pub authz_duration: Histogram,
    pub upstream_duration: Histogram,
    pub upstream_errors: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_success: IntGauge,
    pub tokens_loaded: IntGaugeVec,
    /// Only fed when `metrics.tenant_label` is set.
    pub tenant_requests: IntCounterVec,
    /// JWKS fetches by result (`ok`, `rate_limited`, or the failure kind).
    pub jwks_fetches: IntCounterVec,
    pub jwks_fetch_duration: Histogram,
    /// Usable keys in the last good JWKS.
    pub jwks_keys: IntGauge,
    /// TCP connections opened to the upstream, by either client.
    pub upstream_connections_opened: IntCounter,
    /// Set when the metrics are rendered ([`crate::proxy::Gateway::render_metrics`]).
    pub upstream_idle_connections: IntGauge,
    /// Introspection calls by result (`active`, `inactive`, or the failure kind).
    pub introspection_requests: IntCounterVec,
    pub introspection_duration: Histogram,
    /// Introspection cache lookups, `hit` or `miss` (hit ratio =
    /// hit / (hit + miss)).
    pub introspection_cache: IntCounterVec,
    /// Attenuated tokens, `issued` or `refused`.
    pub attenuations: IntCounterVec,
}

/// The `decision` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionLabel {
    Allow,
    Deny,
    ShadowDeny,
    Public,
}

impl DecisionLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionLabel::Allow => "allow",
            DecisionLabel::Deny => "deny",
            DecisionLabel::ShadowDeny => "shadow_deny",
            DecisionLabel::Public => "public",
        }
    }
}

/// The `method` label values, in [`method_index`] order.
const METHOD_LABELS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
];

fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::PATCH => 4,
        http::Method::DELETE => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The series of `scopegate_requests_total` and
/// `scopegate_request_duration_seconds` that every request touches, looked
/// up once per configuration generation instead of once per request:
/// `with_label_values` hashes the label values (SipHash) and takes the
/// family's lock every time. Indexed by tag: the generation's tags in
/// order, then `public`, then `none`; each tag's series are made on first
/// use, so an unused tag costs one empty slot. A handle is the registry's
/// own series, so counts are the same as through the family.
pub struct HotSeries {
    by_tag: Box<[OnceLock<TagSeries>]>,
}

struct TagSeries {
    duration: Histogram,
    requests: [[OnceLock<IntCounter>; METHOD_LABELS.len()]; 4],
}

impl HotSeries {
    pub fn new(tags: usize) -> HotSeries {
        HotSeries {
            by_tag: (0..tags + 2).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The index of `public` (`none` is the one after it).
    fn public(&self) -> usize {
        self.by_tag.len() - 2
    }

    /// The `tag` label of a request and its slot, from one classification:
    /// `public` for a public route, the route's tag (index and name), or
    /// `none` (no route matched, or a route without a tag).
    pub fn tag<'a>(&self, public: bool, tag: Option<(u32, &'a str)>) -> (usize, &'a str) {
        match tag {
            _ if public => (self.public(), PUBLIC_TAG),
            Some((t, name)) if (t as usize) < self.public() => (t as usize, name),
            _ => (self.public() + 1, NO_TAG),
        }
    }

    fn series(&self, slot: usize, tag: &str, m: &Metrics) -> Option<&TagSeries> {
        let cell = self.by_tag.get(slot)?;
        Some(cell.get_or_init(|| TagSeries {
            duration: m.request_duration.with_label_values(&[tag]),
            requests: Default::default(),
        }))
    }

    /// One request, counted under its decision, tag and method. `tag` is
    /// the label value of `slot`.
    pub fn count(
        &self,
        m: &Metrics,
        slot: usize,
        tag: &str,
        d: DecisionLabel,
        method: &http::Method,
    ) {
        let Some(s) = self.series(slot, tag, m) else {
            m.requests
                .with_label_values(&[d.as_str(), tag, method_label(method)])
                .inc();
            return;
        };
        let mi = method_index(method);
        s.requests[d as usize][mi]
            .get_or_init(|| {
                m.requests
                    .with_label_values(&[d.as_str(), tag, METHOD_LABELS[mi]])
            })
            .inc();
    }

    /// One request's whole duration under its tag.
    pub fn observe(&self, m: &Metrics, slot: usize, tag: &str, seconds: f64) {
        match self.series(slot, tag, m) {
            Some(s) => s.duration.observe(seconds),
            None => m
                .request_duration
                .with_label_values(&[tag])
                .observe(seconds),
        }
    }
}

/// The `method` label: the five methods and HEAD by name, anything else `other`.
pub fn method_label(m: &http::Method) -> &'static str {
    METHOD_LABELS[method_index(m)]
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let requests = IntCounterVec::new(
        Opts::new(
            "scopegate_requests_total",
            "Requests by decision, route tag and method.",
        ),
        &["decision", "tag", "method"],
    )?;
    let denials = IntCounterVec::new(
        Opts::new(
            "scopegate_denials_total",
            "Denied requests by reason and route tag.",
        ),
        &["reason", "tag"],
    )?;
    let request_duration = HistogramVec::new(
        HistogramOpts::new(
            "scopegate_request_duration_seconds",
            "Time from request head to response head, by route tag.",
        )
        .buckets(vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ]),
        &["tag"],
    )?;
    // Microsecond resolution: a cached decision is well under 10 µs.
    let authz_duration = Histogram::with_opts(
        HistogramOpts::new(
            "scopegate_authz_duration_seconds",
            "Time spent in path check, route match, authentication and authorization.",
        )
        .buckets(vec![
            0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
            0.001, 0.005,
        ]),
    )?;
    let upstream_duration = Histogram::with_opts(
        HistogramOpts::new(
            "scopegate_upstream_duration_seconds",
            "Time from forwarding a request to the upstream's response head.",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ]),
    )?;
    let upstream_errors = IntCounterVec::new(
        Opts::new(
            "scopegate_upstream_errors_total",
            "Upstream failures by kind.",
        ),
        &["kind"],
    )?;
    let config_reloads = IntCounterVec::new(
        Opts::new(
            "scopegate_config_reloads_total",
            "Configuration loads by result.",
        ),
        &["result"],
    )?;
    let config_generation = IntGauge::new(
        "scopegate_config_generation",
        "Number of the configuration generation serving requests.",
    )?;
    let config_last_success = IntGauge::new(
        "scopegate_config_last_success_timestamp_seconds",
        "Unix time of the last successful configuration load.",
    )?;
    let tokens_loaded = IntGaugeVec::new(
        Opts::new(
            "scopegate_tokens_loaded",
            "PAT records and JWT keys in the serving generation.",
        ),
        &["kind"],
    )?;
    let tenant_requests = IntCounterVec::new(
        Opts::new(
            "scopegate_tenant_requests_total",
            "Requests by tenant and decision (only with metrics.tenant_label: true).",
        ),
        &["tenant", "decision"],
    )?;
    registry.register(Box::new(tenant_requests.clone()))?;
    let source_buckets = vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let jwks_fetches = IntCounterVec::new(
        Opts::new(
            "scopegate_jwks_fetches_total",
            "JWKS fetches by result: ok, rate_limited, or the failure kind.",
        ),
        &["result"],
    )?;
    let jwks_fetch_duration = Histogram::with_opts(
        HistogramOpts::new(
            "scopegate_jwks_fetch_duration_seconds",
            "Time to fetch and parse the JWKS.",
        )
        .buckets(source_buckets.clone()),
    )?;
    let jwks_keys = IntGauge::new("scopegate_jwks_keys", "Usable keys in the last good JWKS.")?;
    let upstream_connections_opened = IntCounter::new(
        "scopegate_upstream_connections_opened_total",
        "TCP connections the gateway opened to the upstream.",
    )?;
    let upstream_idle_connections = IntGauge::new(
        "scopegate_upstream_idle_connections",
        "Idle connections in the HTTP/1.1 pool to a plaintext upstream, at scrape time.",
    )?;
    registry.register(Box::new(upstream_connections_opened.clone()))?;
    registry.register(Box::new(upstream_idle_connections.clone()))?;
    let introspection_requests = IntCounterVec::new(
        Opts::new(
            "scopegate_introspection_requests_total",
            "Introspection calls by result: active, inactive, or the failure kind.",
        ),
        &["result"],
    )?;
    let introspection_duration = Histogram::with_opts(
        HistogramOpts::new(
            "scopegate_introspection_duration_seconds",
            "Time of one introspection call.",
        )
        .buckets(source_buckets),
    )?;
    let introspection_cache = IntCounterVec::new(
        Opts::new(
            "scopegate_introspection_cache_total",
            "Introspection cache lookups by result (hit, miss).",
        ),
        &["result"],
    )?;
    registry.register(Box::new(jwks_fetches.clone()))?;
    registry.register(Box::new(jwks_fetch_duration.clone()))?;
    registry.register(Box::new(jwks_keys.clone()))?;
    registry.register(Box::new(introspection_requests.clone()))?;
    registry.register(Box::new(introspection_duration.clone()))?;
    registry.register(Box::new(introspection_cache.clone()))?;
    let attenuations = IntCounterVec::new(
        Opts::new(
            "scopegate_attenuations_total",
            "Requests to the attenuation endpoint by result (issued, refused).",
        ),
        &["result"],
    )?;
    registry.register(Box::new(attenuations.clone()))?;
    // The process's one counter (src/logging.rs), in every registry.
    registry.register(Box::new(crate::logging::DROPPED.clone()))?;
    for result in ["hit", "miss"] {
        introspection_cache.with_label_values(&[result]);
    }
    registry.register(Box::new(requests.clone()))?;
    registry.register(Box::new(denials.clone()))?;
    registry.register(Box::new(request_duration.clone()))?;
    registry.register(Box::new(authz_duration.clone()))?;
    registry.register(Box::new(upstream_duration.clone()))?;
    registry.register(Box::new(upstream_errors.clone()))?;
    registry.register(Box::new(config_reloads.clone()))?;
    registry.register(Box::new(config_generation.clone()))?;
    registry.register(Box::new(config_last_success.clone()))?;
    registry.register(Box::new(tokens_loaded.clone()))?;
    // Series that should read 0 rather than be absent.
    for kind in ["connect", "timeout", "protocol"] {
        upstream_errors.with_label_values(&[kind]);
    }
    for result in ["success", "failure"] {
        config_reloads.with_label_values(&[result]);
    }
    Ok(Metrics {
        registry,
        requests,
        denials,
        request_duration,
        authz_duration,
        upstream_duration,
        upstream_errors,
        config_reloads,
        config_generation,
        config_last_success,
        tokens_loaded,
        tenant_requests,
        jwks_fetches,
        jwks_fetch_duration,
        jwks_keys,
        upstream_connections_opened,
        upstream_idle_connections,
        introspection_requests,
        introspection_duration,
        introspection_cache,
        attenuations,
    })
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Metrics {
        // The names and label sets above are static and valid; registering
        // them into a new, empty registry cannot collide.
        build().expect("static metric definitions are valid")
    }

    pub fn denial(&self, reason: Reason, tag: &str) {
        self.denials
            .with_label_values(&[reason.as_str(), tag])
            .inc();
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric data, which the
        // typed families above cannot produce.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family of SPEC §9 is registered with its type, and the series
    /// an alert compares against read 0 before anything happened.
    #[test]
    fn a_registry_renders_every_spec_family() {
        let m = Metrics::new();
        let fresh = String::from_utf8(m.render()).expect("utf8");
        for zero in [
            "scopegate_upstream_errors_total{kind=\"connect\"} 0",
            "scopegate_upstream_errors_total{kind=\"timeout\"} 0",
            "scopegate_upstream_errors_total{kind=\"protocol\"} 0",
            "scopegate_config_reloads_total{result=\"success\"} 0",
            "scopegate_config_reloads_total{result=\"failure\"} 0",
            "scopegate_introspection_cache_total{result=\"hit\"} 0",
            "scopegate_introspection_cache_total{result=\"miss\"} 0",
            "scopegate_config_generation 0",
            "scopegate_upstream_connections_opened_total 0",
        ] {
            assert!(fresh.contains(zero), "{zero} in\n{fresh}");
        }
        // A family with labels has no series until its first count (the
        // prometheus crate renders none): one of each.
        let hot = HotSeries::new(1);
        hot.count(&m, 0, "rules", DecisionLabel::Deny, &http::Method::GET);
        hot.observe(&m, 0, "rules", 0.001);
        m.denial(Reason::Plan, "rules");
        m.tokens_loaded.with_label_values(&["pat"]).set(3);
        let text = String::from_utf8(m.render()).expect("utf8");
        for (name, kind) in [
            ("scopegate_requests_total", "counter"),
            ("scopegate_denials_total", "counter"),
            ("scopegate_request_duration_seconds", "histogram"),
            ("scopegate_authz_duration_seconds", "histogram"),
            ("scopegate_upstream_duration_seconds", "histogram"),
            ("scopegate_upstream_errors_total", "counter"),
            ("scopegate_config_reloads_total", "counter"),
            ("scopegate_config_generation", "gauge"),
            ("scopegate_config_last_success_timestamp_seconds", "gauge"),
            ("scopegate_tokens_loaded", "gauge"),
            // Beyond the spec's table, as the README lists them.
            ("scopegate_log_lines_dropped_total", "counter"),
            ("scopegate_jwks_fetch_duration_seconds", "histogram"),
            ("scopegate_jwks_keys", "gauge"),
            ("scopegate_upstream_connections_opened_total", "counter"),
            ("scopegate_upstream_idle_connections", "gauge"),
            ("scopegate_introspection_duration_seconds", "histogram"),
            ("scopegate_introspection_cache_total", "counter"),
        ] {
            assert!(
                text.contains(&format!("\n# TYPE {name} {kind}\n")),
                "{name} {kind} in\n{text}"
            );
        }
        for line in [
            "scopegate_requests_total{decision=\"deny\",method=\"GET\",tag=\"rules\"} 1",
            "scopegate_request_duration_seconds_count{tag=\"rules\"} 1",
            "scopegate_denials_total{reason=\"plan\",tag=\"rules\"} 1",
            "scopegate_tokens_loaded{kind=\"pat\"} 3",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn hot_series_count_into_the_families_own_series() {
        let m = Metrics::new();
        // Two tags, then `public`, then `none`.
        let hot = HotSeries::new(2);
        assert_eq!(hot.tag(false, Some((1, "rules"))), (1, "rules"));
        assert_eq!(hot.tag(true, None), (2, PUBLIC_TAG));
        assert_eq!(hot.tag(true, Some((0, "markers"))), (2, PUBLIC_TAG));
        assert_eq!(hot.tag(false, None), (3, NO_TAG));
        assert_eq!(
            hot.tag(false, Some((7, "gone"))),
            (3, NO_TAG),
            "a tag index out of range is none"
        );
        // Every tag keeps its own slot whatever the count, `public` and
        // `none` after them.
        for n in 0..8u32 {
            let hot = HotSeries::new(n as usize);
            for t in 0..n {
                assert_eq!(
                    hot.tag(false, Some((t, "t"))),
                    (t as usize, "t"),
                    "{t} of {n}"
                );
            }
            assert_eq!(hot.tag(true, None), (n as usize, PUBLIC_TAG), "{n}");
            assert_eq!(
                hot.tag(false, Some((n, "x"))),
                (n as usize + 1, NO_TAG),
                "{n}"
            );
        }
        let methods = [
            http::Method::GET,
            http::Method::HEAD,
            http::Method::POST,
            http::Method::PUT,
            http::Method::PATCH,
            http::Method::DELETE,
            http::Method::OPTIONS,
            http::Method::from_bytes(b"PURGE").expect("method"),
        ];
        let decisions = [
            DecisionLabel::Allow,
            DecisionLabel::Deny,
            DecisionLabel::ShadowDeny,
            DecisionLabel::Public,
        ];
        for (slot, tag) in [(0, "markers"), (1, "rules"), (2, PUBLIC_TAG), (3, NO_TAG)] {
            for (i, d) in decisions.iter().enumerate() {
                for (j, method) in methods.iter().enumerate() {
                    // A distinct count per series, so a crossed index shows.
                    for _ in 0..=(slot * 100 + i * 10 + j) {
                        hot.count(&m, slot, tag, *d, method);
                    }
                }
            }
            hot.observe(&m, slot, tag, 0.25);
        }
        for (slot, tag) in [(0, "markers"), (1, "rules"), (2, PUBLIC_TAG), (3, NO_TAG)] {
            for (i, d) in decisions.iter().enumerate() {
                for (j, method) in methods.iter().enumerate() {
                    let got = m
                        .requests
                        .with_label_values(&[d.as_str(), tag, method_label(method)])
                        .get();
                    assert_eq!(
                        got,
                        (slot * 100 + i * 10 + j + 1) as u64,
                        "{tag} {d:?} {method}"
                    );
                }
            }
            let h = m.request_duration.with_label_values(&[tag]);
            assert_eq!(h.get_sample_count(), 1, "{tag}");
        }
    }
}
