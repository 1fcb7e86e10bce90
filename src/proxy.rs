//! The request path: decide, then forward or deny (SPEC §6, §7).
//!
//! Owns the [`Gateway`] (the current [`Generation`] behind one `ArcSwap`,
//! and the metrics), the per-request handler, the rewriting of request and
//! response headers, and forwarding with the pooled hyper client. Bodies are
//! streamed in both directions, never buffered. A request loads the
//! generation once and uses it to the end, so a reload never changes the
//! rules under a request in flight.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::config::{Mode, Snapshot, Upstream};
use crate::decision::{Outcome, decide, decide_with};
use crate::error::{self, Reason};
use crate::metrics::{DecisionLabel, HotSeries, Metrics};

// Header names built once, at compile time: `HeaderName::from_static` in
// an expression parses and validates the name on every call (about 130
// instructions each, counted under cachegrind).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The headers the gateway adds to a forwarded request (SPEC §7), in the
/// order they are written: forwarding, then identity.
static ADDED_NAMES: [HeaderName; 10] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REQUEST_ID,
    HeaderName::from_static("x-airbrx-token-id"),
    HeaderName::from_static("x-airbrx-subject"),
    HeaderName::from_static("x-airbrx-account"),
    HeaderName::from_static("x-airbrx-tenant"),
    HeaderName::from_static("x-airbrx-tag"),
    HeaderName::from_static("x-airbrx-plan"),
];

/// The headers the gateway adds to one forwarded request: `X-Forwarded-*`,
/// `X-Request-Id`, and the identity headers from the verified decision
/// only. Every client header of these names is removed from the request
/// first, so they never sit beside a client's: the in-future upstream
/// client appends them to the request head as it writes it, and only
/// hyper's client needs them in the header map (ten map inserts, and the
/// map's growth to hold them, were 8% of a request's instructions).
#[derive(Default)]
pub struct Added {
    values: [Option<HeaderValue>; 10],
}

impl Added {
    pub fn headers(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> + Send {
        ADDED_NAMES
            .iter()
            .zip(&self.values)
            .filter_map(|(n, v)| v.as_ref().map(|v| (n, v)))
    }

    /// Into a header map that has none of these names left.
    pub fn insert_into(&self, h: &mut HeaderMap) {
        h.reserve(self.values.len());
        for (n, v) in self.headers() {
            h.insert(n.clone(), v.clone());
        }
    }
}

/// The client end of one connection, with what each of its forwarded
/// requests repeats worked out once, at accept: the address as the
/// `X-Forwarded-For` value (formatting it per request was 4% of the
/// gateway's instructions).
#[derive(Debug)]
pub struct Peer {
    /// Whether the connection arrived over TLS (`X-Forwarded-Proto`).
    tls: bool,
    forwarded_for: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr, tls: bool) -> Peer {
        let text = AddrText::of(addr.ip());
        // One allocation, shared by every request's copy: the text and
        // its count live together (from a `Vec` with room to spare,
        // `Bytes` allocated the count on its own).
        let forwarded_for = Some(text)
            .filter(|t| t.len > 0)
            .and_then(|t| HeaderValue::from_maybe_shared(Bytes::from_owner(t)).ok())
            .unwrap_or_else(|| HeaderValue::from_static("unknown"));
        Peer { tls, forwarded_for }
    }
}

/// The `X-Forwarded-For` text of the address the last connection came
/// from, kept by an accept loop: a client that opens a connection for each
/// request (most often one address, the application beside a sidecar)
/// has its text made once, and each connection after shares it: no
/// formatting and no allocation (`Peer::new` alone was 203 of such a
/// request's 32,000 instructions).
#[derive(Default)]
pub(crate) struct PeerTexts {
    last: Option<(std::net::IpAddr, HeaderValue)>,
}

impl PeerTexts {
    /// [`Peer::new`], sharing the text of the previous address when it is
    /// the same.
    pub(crate) fn peer(&mut self, addr: SocketAddr, tls: bool) -> Peer {
        let ip = addr.ip();
        if let Some((last, text)) = &self.last
            && *last == ip
        {
            return Peer {
                tls,
                forwarded_for: text.clone(),
            };
        }
        let peer = Peer::new(addr, tls);
        self.last = Some((ip, peer.forwarded_for.clone()));
        peer
    }
}

/// An IP address in text, inline.
struct AddrText {
    /// The longest IPv6 text is 45 bytes (`ffff:…:255.255.255.255`).
    buf: [u8; 46],
    len: usize,
}

impl AddrText {
    fn of(ip: std::net::IpAddr) -> AddrText {
        let mut t = AddrText {
            buf: [0; 46],
            len: 0,
        };
        match ip {
            // By hand: `to_string` went through `core::fmt` and grew its
            // String, about 900 instructions, 2.5% of a request on a
            // connection of its own.
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b'.');
                    }
                    if octet >= 100 {
                        t.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        t.push(b'0' + octet / 10 % 10);
                    }
                    t.push(b'0' + octet % 10);
                }
            }
            ip => {
                use std::io::Write;
                let mut w = std::io::Cursor::new(&mut t.buf[..]);
                // Cannot fail: the buffer holds the longest address.
                if write!(w, "{ip}").is_ok() {
                    t.len = usize::try_from(w.position()).unwrap_or(0);
                }
            }
        }
        t
    }

    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }
}

impl AsRef<[u8]> for AddrText {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use crate::upstream::UpstreamClient;

/// What the gateway answers with: a small generated body, or the upstream's
/// streamed one.
pub type ResponseBody = Either<Full<Bytes>, UpstreamBody>;

/// What a request arrives with: hyper's streamed body; or, from the
/// listener's own HTTP/1 loop (src/server/fast.rs), none, a body framed
/// by `Content-Length` that had arrived whole with its head (taken as it
/// lay in the read buffer; `None` once yielded), or one the loop reads
/// from the client as it is taken (too large to take whole, or not all
/// there with its head).
pub enum RequestBody {
    Incoming(Incoming),
    Empty,
    Arrived(Option<Bytes>),
    Streamed(crate::server::streamed::Streamed),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Arrived(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Streamed(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Incoming(b) => b.is_end_stream(),
            RequestBody::Empty => true,
            RequestBody::Arrived(b) => b.is_none(),
            RequestBody::Streamed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Incoming(b) => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Arrived(b) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            RequestBody::Streamed(b) => b.size_hint(),
        }
    }
}

/// A configuration snapshot and the client built for its upstream settings,
/// published together with one store.
pub struct Generation {
    pub number: u64,
    pub snapshot: Snapshot,
    pub client: UpstreamClient,
    /// The request series of this generation's tags.
    pub hot: HotSeries,
}

impl Generation {
    /// Pair a snapshot with a client. The previous generation's client (and
    /// its warm connections) is reused when the upstream settings are equal.
    pub fn new(
        number: u64,
        mut snapshot: Snapshot,
        previous: Option<&Generation>,
        metrics: &Metrics,
    ) -> Result<Generation, String> {
        if let Some(p) = previous {
            carry_token_sources(&p.snapshot, &mut snapshot);
        }
        let client = match previous {
            Some(p) if same_upstream(&p.snapshot.upstream, &snapshot.upstream) => p.client.clone(),
            _ => UpstreamClient::build(&snapshot.upstream, &metrics.upstream_connections_opened)?,
        };
        Ok(Generation {
            number,
            hot: HotSeries::new(snapshot.tags.len()),
            snapshot,
            client,
        })
    }
}

/// Keep the running JWKS source and introspector (their keys, cache and
/// background refresh) when a reload leaves their settings unchanged.
fn carry_token_sources(prev: &Snapshot, next: &mut Snapshot) {
    if let (Some(old), Some(new)) = (&prev.jwt.jwks, &mut next.jwt.jwks)
        && old.identity() == new.identity()
    {
        old.adopt(new);
        *new = old.clone();
    }
    if let (Some(old), Some(new)) = (&prev.introspection, &mut next.introspection)
        && old.identity() == new.identity()
    {
        *new = old.clone();
    }
}

fn same_upstream(a: &Upstream, b: &Upstream) -> bool {
    a.scheme == b.scheme
        && a.authority == b.authority
        && a.connect_timeout == b.connect_timeout
        && a.http2 == b.http2
        && a.ca_sha256 == b.ca_sha256
}

/// The gateway: the serving generation and the metrics.
pub struct Gateway {
    current: ArcSwap<Generation>,
    pub metrics: Metrics,
    /// The last failed reload's errors, until a reload succeeds.
    last_error: std::sync::Mutex<Option<String>>,
    /// What each token used (`None` when `usage.enabled` is false at start).
    pub usage: Option<crate::usage::UsageBook>,
    /// Requests the listener's own HTTP/1 loop served, added when each of
    /// its connections ends (a shared counter per request would cost more
    /// than the loop saves on two cores). For tests and diagnostics.
    pub own_h1_served: std::sync::atomic::AtomicU64,
}

impl Gateway {
    /// A gateway serving `snapshot` as generation 1.
    pub fn new(snapshot: Snapshot) -> Result<Arc<Gateway>, String> {
        let metrics = Metrics::new();
        let u = &snapshot.usage;
        let usage = u
            .enabled
            .then(|| crate::usage::UsageBook::new(u.max_tokens, u.max_calls));
        let generation = Generation::new(1, snapshot, None, &metrics)?;
        let gw = Gateway {
            current: ArcSwap::from_pointee(generation),
            metrics,
            last_error: std::sync::Mutex::new(None),
            usage,
            own_h1_served: std::sync::atomic::AtomicU64::new(0),
        };
        gw.record_success(&gw.current());
        gw.start_sources(&gw.current());
        Ok(Arc::new(gw))
    }

    /// Start the background refresh of a generation's JWKS (once per source).
    fn start_sources(&self, g: &Generation) {
        if let Some(j) = &g.snapshot.jwt.jwks {
            j.start(self.metrics.clone());
        }
    }

    /// The serving generation.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// The metrics in Prometheus text format, with the gauges read at
    /// scrape time brought up to date.
    pub fn render_metrics(&self) -> Vec<u8> {
        if let Some(n) = self.current().client.idle() {
            self.metrics
                .upstream_idle_connections
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.metrics.render()
    }

    /// Publish a new snapshot as the next generation (one store). Returns
    /// the new generation number.
    pub fn publish(&self, snapshot: Snapshot) -> Result<u64, String> {
        let prev = self.current();
        let next = Generation::new(prev.number + 1, snapshot, Some(&prev), &self.metrics)?;
        let n = next.number;
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.record_success(&next);
        self.start_sources(&next);
        Ok(n)
    }

    /// Count a failed reload and remember its errors for `/config`.
    pub fn record_failure(&self, errors: &str) {
        self.metrics
            .config_reloads
            .with_label_values(&["failure"])
            .inc();
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(errors.to_string());
        }
    }

    /// The errors of the last reload, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn record_success(&self, g: &Generation) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
        let m = &self.metrics;
        m.config_reloads.with_label_values(&["success"]).inc();
        m.config_generation
            .set(i64::try_from(g.number).unwrap_or(i64::MAX));
        let ts = g
            .snapshot
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        m.config_last_success.set(i64::try_from(ts).unwrap_or(0));
        m.tokens_loaded
            .with_label_values(&["pat"])
            .set(g.snapshot.pats.len() as i64);
        m.tokens_loaded
            .with_label_values(&["jwt_key"])
            .set(g.snapshot.jwt.keys.len() as i64);
    }

    /// Handle one request end to end. Never fails: every problem becomes a
    /// response.
    pub async fn handle(&self, req: Request<RequestBody>, peer: &Peer) -> Response<ResponseBody> {
        let started = Instant::now();
        let generation = self.current();
        let snap = &generation.snapshot;
        let request_id = request_id(req.headers());
        let (parts, body) = req.into_parts();
        if let Some(att) = &snap.attenuation
            && parts.method == http::Method::POST
            && parts.uri.path() == att.path
        {
            let now = unix_now();
            let principal = authenticate_with_sources(snap, &self.metrics, &parts.headers, now)
                .await
                .map_err(Reason::from);
            let mut resp = crate::attenuate::handle(
                att,
                snap,
                principal,
                &parts.headers,
                body,
                now,
                request_id.to_str().unwrap_or(""),
            )
            .await;
            self.metrics
                .attenuations
                .with_label_values(&[if resp.status() == http::StatusCode::CREATED {
                    "issued"
                } else {
                    "refused"
                }])
                .inc();
            resp.headers_mut().insert(X_REQUEST_ID, request_id);
            return resp.map(Either::Left);
        }
        // Decide on a clone of the URI (refcounted bytes) so `parts` can move
        // into the forwarded request while the outcome borrows the path.
        let uri = parts.uri.clone();
        let method = parts.method.clone();
        let now = unix_now();
        let mut outcome = decide(snap, &parts.method, uri.path(), &parts.headers, now);
        self.metrics
            .authz_duration
            .observe(started.elapsed().as_secs_f64());
        if let Err(first) = outcome.verdict
            && let Some(second) = consult_token_sources(
                snap,
                &self.metrics,
                first,
                &method,
                uri.path(),
                &parts.headers,
                now,
            )
            .await
        {
            outcome = second;
        }

        let names = outcome.matched.map(|m| m.names(snap));
        let (slot, tag) = generation.hot.tag(
            outcome.matched.is_some_and(|m| m.route.is_public()),
            outcome
                .matched
                .and_then(|m| m.route.tag)
                .zip(names.and_then(|n| n.tag)),
        );
        let (label, denied) = match outcome.verdict {
            Ok(true) => (DecisionLabel::Allow, None),
            Ok(false) => (DecisionLabel::Public, None),
            // Shadow mode forwards every denial except an ambiguous path:
            // forwarding that would hand the upstream a path we could not read.
            Err(r) if snap.mode == Mode::Shadow && r != Reason::BadPath => {
                (DecisionLabel::ShadowDeny, Some(r))
            }
            Err(r) => (DecisionLabel::Deny, Some(r)),
        };
        if let Some(r) = denied {
            self.metrics.denial(r, tag);
        }
        if label == DecisionLabel::Allow
            && let (Some(book), Some(p), Some(n)) = (&self.usage, &outcome.principal, &names)
        {
            book.record(p, &method, n, snap, generation.number, now);
        }
        generation
            .hot
            .count(&self.metrics, slot, tag, label, &parts.method);
        if snap.metrics.tenant_label
            && let Some(tenant) = names.and_then(|n| n.tenant)
        {
            self.metrics
                .tenant_requests
                .with_label_values(&[tenant, label.as_str()])
                .inc();
        }

        let mut upstream_time = None;
        let mut ended = None;
        let (response, final_reason) = if label == DecisionLabel::Deny {
            let allow = outcome.matched.map(|m| &m.route.allow);
            let reason = denied.unwrap_or(Reason::BadPath);
            // The account is named only when the path names it, or the
            // token already covers the tenant (account and plan denials):
            // otherwise it would tell a stranger which account owns a tenant.
            let path_names_account = outcome.matched.is_some_and(|m| m.route.has_account);
            let required = names.and_then(|n| {
                Some(error::Required {
                    method: method.as_str(),
                    route: n.route,
                    tag: n.tag?,
                    tenant: n.tenant,
                    account: n.account.filter(|_| {
                        path_names_account || matches!(reason, Reason::Account | Reason::Plan)
                    }),
                })
            });
            (
                error::response_with(reason, &request_id, allow, required.as_ref())
                    .map(Either::Left),
                Some(reason),
            )
        } else {
            let forward_started = Instant::now();
            let result = forward(
                &generation,
                &outcome,
                parts,
                body,
                &request_id,
                peer,
                forward_started,
            )
            .await;
            // One clock reading ends both the upstream's time and the total.
            let now = Instant::now();
            ended = Some(now);
            let elapsed = now.saturating_duration_since(forward_started);
            upstream_time = Some(elapsed);
            self.metrics
                .upstream_duration
                .observe(elapsed.as_secs_f64());
            match result {
                Ok(resp) => (resp, denied),
                Err(e) => {
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[e.kind()])
                        .inc();
                    let reason = e.reason();
                    self.metrics.denial(reason, tag);
                    (
                        error::response(reason, &request_id, None).map(Either::Left),
                        Some(reason),
                    )
                }
            }
        };
        let total = ended
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(started);
        generation
            .hot
            .observe(&self.metrics, slot, tag, total.as_secs_f64());
        access_log(
            snap,
            &outcome,
            method.as_str(),
            &request_id,
            label,
            final_reason,
            response.status(),
            total,
            upstream_time,
        );
        response
    }
}

/// The asynchronous second chance of the authentication phase, given why
/// the first (synchronous) one failed: a `kid` the JWKS does not have (or no
/// JWKS yet) refetches it once, single flight, and authenticates again; a
/// PAT not in the PAT file goes to introspection. `None` when no source
/// applies (the first answer stands).
async fn second_authentication<'s>(
    snap: &'s Snapshot,
    metrics: &Metrics,
    first: crate::token::AuthError,
    headers: &HeaderMap,
    now: i64,
) -> Option<Result<crate::token::Principal<'s>, crate::token::AuthError>> {
    use crate::token::AuthError;
    match first {
        AuthError::UnknownKey | AuthError::KeySourceUnavailable => {
            snap.jwt.jwks.as_ref()?.refetch(metrics).await;
            Some(crate::decision::authenticate(snap, headers, now))
        }
        AuthError::UnknownToken => {
            let introspector = snap.introspection.as_ref()?;
            let token = crate::token::bearer(headers).ok()?;
            if !crate::token::pat::well_formed(token) {
                return None;
            }
            Some(
                introspector
                    .lookup(token, now, metrics)
                    .await
                    .and_then(|a| crate::token::introspect::principal(&a, &snap.vocabulary())),
            )
        }
        _ => None,
    }
}

/// Authentication alone (no route), with the token sources' second chance:
/// for the attenuation endpoint.
pub async fn authenticate_with_sources<'s>(
    snap: &'s Snapshot,
    metrics: &Metrics,
    headers: &HeaderMap,
    now: i64,
) -> Result<crate::token::Principal<'s>, crate::token::AuthError> {
    match crate::decision::authenticate(snap, headers, now) {
        Err(first) => second_authentication(snap, metrics, first, headers, now)
            .await
            .unwrap_or(Err(first)),
        ok => ok,
    }
}

/// A whole decision given another chance by the token sources when the
/// first one failed in authentication (see `second_authentication`);
/// every other phase runs again exactly as in [`decide`]. `None` when no
/// source applies. The proxy and `scopegate explain` both use it.
pub async fn consult_token_sources<'s, 'r>(
    snap: &'s Snapshot,
    metrics: &Metrics,
    first: Reason,
    method: &http::Method,
    path: &'r str,
    headers: &HeaderMap,
    now: i64,
) -> Option<Outcome<'s, 'r>> {
    use crate::token::AuthError;
    let first = match first {
        Reason::UnknownKey => AuthError::UnknownKey,
        Reason::KeySourceUnavailable => AuthError::KeySourceUnavailable,
        Reason::UnknownToken => AuthError::UnknownToken,
        _ => return None,
    };
    let again = second_authentication(snap, metrics, first, headers, now).await?;
    Some(decide_with(snap, method, path, headers, now, Some(again)))
}

/// Why forwarding failed.
#[derive(Debug)]
enum ForwardError {
    Connect,
    Timeout,
    Protocol,
}

impl ForwardError {
    fn kind(&self) -> &'static str {
        match self {
            ForwardError::Connect => "connect",
            ForwardError::Timeout => "timeout",
            ForwardError::Protocol => "protocol",
        }
    }

    fn reason(&self) -> Reason {
        match self {
            ForwardError::Timeout => Reason::UpstreamTimeout,
            _ => Reason::UpstreamUnavailable,
        }
    }
}

async fn forward(
    generation: &Generation,
    outcome: &Outcome<'_, '_>,
    mut parts: http::request::Parts,
    body: RequestBody,
    request_id: &HeaderValue,
    peer: &Peer,
    started: Instant,
) -> Result<Response<ResponseBody>, ForwardError> {
    let snap = &generation.snapshot;
    let up = &snap.upstream;
    let deadline = tokio::time::Instant::from_std(started) + up.timeout;

    // The path exactly as checked, and the query unchanged.
    let path = outcome.path.as_deref().unwrap_or("/");
    let uri = match parts.uri.path_and_query() {
        // Unchanged by canonicalization (the usual case): reuse the
        // received bytes, already validated, without a copy.
        Some(pq) if pq.path() == path => Uri::from(pq.clone()),
        _ => {
            let path_and_query = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            Uri::try_from(path_and_query).map_err(|_| ForwardError::Protocol)?
        }
    };
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    // Out of the map: what the gateway sets itself, and what it never
    // forwards. The values it adds come back in `added`.
    let host = h.remove(header::HOST);
    if !up.forward_authorization {
        h.remove(header::AUTHORIZATION);
    }
    // Every name below starts with `x-`, and most requests carry no such
    // header: one pass over the names instead of five lookups (about 350
    // instructions a request, callgrind).
    let mut client_forwarded_for = None;
    if h.keys().any(|k| k.as_str().starts_with("x-")) {
        remove_prefixed(h, "x-airbrx-");
        client_forwarded_for = h.remove(X_FORWARDED_FOR);
        h.remove(X_FORWARDED_PROTO);
        h.remove(X_FORWARDED_HOST);
        h.remove(X_REQUEST_ID);
    }
    let original_host = host.or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let mut added = identity(snap, outcome);
    let [forwarded_for, forwarded_proto, forwarded_host, id, ..] = &mut added.values;
    *forwarded_for = Some(forwarded_for_value(client_forwarded_for, peer));
    *forwarded_proto = Some(HeaderValue::from_static(if peer.tls {
        "https"
    } else {
        "http"
    }));
    *forwarded_host = original_host;
    *id = Some(request_id.clone());

    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let req = Request::from_parts(parts, body);

    let (resp, checkin) =
        match tokio::time::timeout_at(deadline, generation.client.send(req, &added)).await {
            Err(_) => return Err(ForwardError::Timeout),
            Ok(Err(crate::upstream::SendError::Connect)) => return Err(ForwardError::Connect),
            Ok(Err(crate::upstream::SendError::Protocol)) => return Err(ForwardError::Protocol),
            Ok(Ok(r)) => r,
        };
    let (mut parts, body) = resp.into_parts();
    // The gateway answers in its own version, whatever the upstream's
    // (RFC 9110 §6.2): hyper's server writes the status line with the
    // response's version, so an HTTP/1.0 upstream made it say HTTP/1.0 to
    // an HTTP/1.1 client and end an unsized body by closing the client's
    // connection. A client's own HTTP/1.0 is the servers' to answer.
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    match parts.headers.get_mut(X_REQUEST_ID) {
        // The upstream's own, usually ours echoed: as unique, so flagged
        // the same way (see `request_id`).
        Some(v) => v.set_sensitive(true),
        None => {
            parts.headers.insert(X_REQUEST_ID, request_id.clone());
        }
    }
    let body = UpstreamBody {
        inner: body,
        deadline,
        timer: None,
        checkin,
    };
    Ok(Response::from_parts(parts, Either::Right(body)))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and every header the `Connection`
/// header names. Done before the identity headers are set, so a client
/// cannot use `Connection` to strip them. Also `Expect: 100-continue`: the
/// gateway's own server has answered it (`100 Continue` when the body is
/// first read), and the body follows whatever the upstream says, so it is
/// not passed on, as Envoy does by default; an upstream that got it would
/// answer `100 Continue` to no purpose, and the in-future client
/// (src/h1.rs), which takes bytes from the upstream before the body has
/// gone for an early final answer, relies on it not being asked to.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, noting which are
    // there, instead of a hash lookup for each.
    let present = h.keys().fold(0, |all, k| all | hop_by_hop(k));
    if present == 0 {
        return;
    }
    if present & HOP_CONNECTION != 0 {
        // The fields its options name, other than the hop-by-hop ones
        // removed below. Only names present are taken (and allocated), so
        // the usual `close` and `keep-alive` cost no allocation.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty() && !is_hop_by_hop_text(n) && h.contains_key(*n))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for (bit, name) in HOP_BY_HOP {
        if present & bit != 0 {
            h.remove(name);
        }
    }
    if present & HOP_PROXY != 0 {
        remove_prefixed(h, "proxy-");
    }
    if present & EXPECT != 0
        && h.get_all(header::EXPECT)
            .iter()
            .all(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        h.remove(header::EXPECT);
    }
}

const HOP_CONNECTION: u8 = 1;
const HOP_PROXY: u8 = 1 << 6;
/// `Expect` (not hop-by-hop, but see [`strip_hop_by_hop`]).
const EXPECT: u8 = 1 << 7;
/// The hop-by-hop names (RFC 9110 §7.6.1), each with its bit in what
/// [`hop_by_hop`] returns; `proxy-*` has [`HOP_PROXY`].
const HOP_BY_HOP: [(u8, HeaderName); 6] = [
    (HOP_CONNECTION, header::CONNECTION),
    (1 << 1, header::TE),
    (1 << 2, header::TRAILER),
    (1 << 3, header::TRANSFER_ENCODING),
    (1 << 4, header::UPGRADE),
    (1 << 5, HeaderName::from_static("keep-alive")),
];

/// The bit of a hop-by-hop name (or of `Expect`), or 0.
fn hop_by_hop(n: &HeaderName) -> u8 {
    for (bit, name) in &HOP_BY_HOP {
        if n == name {
            return *bit;
        }
    }
    if n.as_str().starts_with("proxy-") {
        HOP_PROXY
    } else if n == header::EXPECT {
        EXPECT
    } else {
        0
    }
}

/// Whether a name as a `Connection` option spells it (any case) is
/// hop-by-hop.
fn is_hop_by_hop_text(n: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|(_, name)| n.eq_ignore_ascii_case(name.as_str()))
        || n.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("proxy-"))
}

/// Remove every header whose (lower-case) name starts with `prefix`. The
/// list of names is only allocated when one is present.
fn remove_prefixed(h: &mut HeaderMap, prefix: &str) {
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with(prefix))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// The client's `X-Forwarded-For` (the first, when it sent several) with
/// the peer's address appended, or the address alone.
fn forwarded_for_value(client: Option<HeaderValue>, peer: &Peer) -> HeaderValue {
    let own = &peer.forwarded_for;
    match client.as_ref().and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let mut joined = Vec::with_capacity(prev.len() + 2 + own.len());
            joined.extend_from_slice(prev.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(own.as_bytes());
            HeaderValue::try_from(joined).unwrap_or_else(|_| own.clone())
        }
        _ => own.clone(),
    }
}

/// Identity headers from the verified decision only (SPEC §7).
fn identity(snap: &Snapshot, outcome: &Outcome<'_, '_>) -> Added {
    let mut id = Added::default();
    let [_, _, _, _, token_id, subject, account, tenant, tag, plan] = &mut id.values;
    if let Some(p) = &outcome.principal {
        (*token_id, *subject) = p.identity_headers();
    }
    let Some(m) = outcome.matched else { return id };
    *account = m
        .account
        .and_then(|a| snap.accounts.get(a as usize))
        .map(|a| a.header.clone());
    *tenant = m
        .tenant
        .and_then(|t| snap.tenants.get(t as usize))
        .map(|t| t.header.clone());
    *tag = m
        .route
        .tag
        .and_then(|t| snap.tag_headers.get(t as usize))
        .cloned();
    *plan = m
        .plan
        .and_then(|p| snap.plan_headers.get(p as usize))
        .cloned();
    id
}

/// The incoming `X-Request-Id` when it is a sane token, else a new one.
///
/// The value is flagged sensitive. That changes nothing on HTTP/1; on
/// HTTP/2 it makes HPACK send it as a literal that is never indexed. A
/// value unique to each response would otherwise enter the connection's
/// dynamic table every time, evict the entries that do repeat (`date`,
/// the upstream's own), and cost the encoder a compare with every earlier
/// id still in the table: about 4% of the gateway's CPU over h2c.
fn request_id(h: &HeaderMap) -> HeaderValue {
    let mut id = h
        .get(X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
        })
        .cloned()
        .unwrap_or_else(new_request_id);
    id.set_sensitive(true);
    id
}

fn new_request_id() -> HeaderValue {
    let mut id = [0u8; 32];
    // Cannot fail: 16 bytes fill exactly 32 hex digits.
    let _ = hex::encode_to_slice(fastrand::u128(..).to_be_bytes(), &mut id);
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn access_log(
    snap: &Snapshot,
    outcome: &Outcome<'_, '_>,
    method: &str,
    request_id: &HeaderValue,
    decision: DecisionLabel,
    reason: Option<Reason>,
    status: http::StatusCode,
    total: Duration,
    upstream: Option<Duration>,
) {
    // Formatting the line costs more than the decision; skip it all when
    // the access log is filtered out.
    if !tracing::enabled!(target: "scopegate::access", tracing::Level::INFO) {
        return;
    }
    let names = outcome.matched.map(|m| m.names(snap)).unwrap_or_default();
    let (route, tag, tenant, account) = (
        names.route,
        names.tag.unwrap_or(""),
        names.tenant.unwrap_or(""),
        names.account.unwrap_or(""),
    );
    let (token_id, token_kind) = outcome
        .principal
        .as_ref()
        .map(|p| (p.token_id(), p.kind().as_str()))
        .unwrap_or(("", ""));
    crate::logging::access(&crate::logging::AccessLine {
        time: SystemTime::now(),
        request_id: request_id.to_str().unwrap_or(""),
        method,
        route,
        tag,
        tenant,
        account,
        token_id,
        token_kind,
        decision: decision.as_str(),
        reason: reason.map(Reason::as_str).unwrap_or(""),
        status: status.as_u16(),
        duration_us: total.as_micros() as u64,
        upstream_us: upstream.map(|d| d.as_micros() as u64).unwrap_or(0),
    });
}

/// The upstream's response body, cut off when the whole-response deadline
/// (`upstream.timeout`) passes. Its connection goes back to the pool when
/// the body has ended, and is closed when the body is dropped unfinished or
/// fails.
pub struct UpstreamBody {
    inner: crate::upstream::UpBody,
    deadline: tokio::time::Instant,
    /// The deadline's timer, made the first time the body has to wait: a
    /// body that is already in hand (the usual small answer) never
    /// allocates or registers one.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    checkin: Option<crate::upstream::Checkin>,
}

impl UpstreamBody {
    fn give_back(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.give_back();
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            match &frame {
                None => this.give_back(),
                Some(Ok(_)) if this.inner.is_end_stream() => this.give_back(),
                Some(Ok(_)) => {}
                Some(Err(_)) => this.checkin = None,
            }
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            this.checkin = None;
            return Poll::Ready(Some(Err("upstream response deadline passed".into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarded_for_value_is_the_address_as_std_writes_it() {
        let mut addrs: Vec<std::net::IpAddr> = [
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "10.0.9.99",
            "100.20.3.4",
            "::1",
            "::ffff:192.0.2.10",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "1:2:3:4:5:6:7:8",
        ]
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect();
        let mut rng = fastrand::Rng::with_seed(7);
        addrs.extend((0..2_000).map(|_| std::net::IpAddr::from(rng.u32(..).to_be_bytes())));
        for ip in addrs {
            let peer = Peer::new(SocketAddr::new(ip, 443), false);
            assert_eq!(
                peer.forwarded_for.as_bytes(),
                ip.to_string().as_bytes(),
                "{ip}"
            );
        }
    }

    /// The accept loop's text cache gives each connection its own
    /// address's text, whether the address repeats, alternates or changes
    /// port, and the connection's own TLS flag.
    #[test]
    fn peer_texts_follow_each_connections_address() {
        let mut texts = PeerTexts::default();
        let a: std::net::IpAddr = "10.0.0.1".parse().expect("address");
        let b: std::net::IpAddr = "2001:db8::1".parse().expect("address");
        for (i, (ip, port, tls)) in [
            (a, 1000, false),
            (a, 1001, true),
            (b, 1000, false),
            (b, 1000, true),
            (a, 1000, false),
            (b, 2000, false),
        ]
        .into_iter()
        .enumerate()
        {
            let peer = texts.peer(SocketAddr::new(ip, port), tls);
            assert_eq!(
                peer.forwarded_for.as_bytes(),
                ip.to_string().as_bytes(),
                "{i}"
            );
            assert_eq!(peer.tls, tls, "{i}");
        }
    }

    /// What `strip_hop_by_hop` did before it skipped the names that are not
    /// there: every name the `Connection` options spell, and every
    /// hop-by-hop name, removed.
    fn strip_model(h: &mut HeaderMap) {
        let mut remove: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        remove.extend(
            h.keys()
                .filter(|k| {
                    let n = k.as_str();
                    [
                        "connection",
                        "te",
                        "trailer",
                        "transfer-encoding",
                        "upgrade",
                        "keep-alive",
                    ]
                    .contains(&n)
                        || n.starts_with("proxy-")
                })
                .cloned(),
        );
        for n in remove {
            h.remove(n);
        }
        // And `Expect` when every value it has is `100-continue`.
        if h.get_all(header::EXPECT).iter().all(|v| {
            v.to_str()
                .is_ok_and(|v| v.eq_ignore_ascii_case("100-continue"))
        }) {
            h.remove(header::EXPECT);
        }
    }

    proptest::proptest! {
        #[test]
        fn hop_by_hop_stripping_removes_what_the_model_removes(
            fields in proptest::collection::vec((0usize..16, 0usize..12), 0..10),
        ) {
            const NAMES: [&str; 16] = [
                "connection", "connection", "te", "trailer", "transfer-encoding", "upgrade",
                "keep-alive", "proxy-authorization", "proxy-x", "x-drop", "x-keep", "close",
                "host", "x-airbrx-tenant", "expect", "expect",
            ];
            // Connection values: options in any case, lists, hop-by-hop
            // names, names that are not there, and ones no field may have;
            // and expectations.
            const VALUES: [&str; 12] = [
                "close", "keep-alive", "X-Drop", "x-drop, Keep-Alive", "Proxy-X, te",
                "Close, x-airbrx-tenant", "a b, ,", "TRAILER,upgrade", "x-absent",
                "100-continue", "100-Continue", "expect",
            ];
            let mut h = HeaderMap::new();
            for (n, v) in fields {
                h.append(NAMES[n], HeaderValue::from_static(VALUES[v]));
            }
            let mut want = h.clone();
            strip_model(&mut want);
            strip_hop_by_hop(&mut h);
            proptest::prop_assert_eq!(h, want);
        }
    }

    /// Each kind of hop-by-hop field on its own, beside a field that stays:
    /// the one-pass check of which kinds are present must see each alone
    /// (the proptest above rarely draws a `Connection` with nothing else).
    #[test]
    fn each_hop_by_hop_kind_alone_is_stripped() {
        let cases: [&[(&str, &str)]; 5] = [
            &[("connection", "X-Drop"), ("x-drop", "1")],
            &[("te", "trailers")],
            &[("proxy-authorization", "Basic eA==")],
            &[("keep-alive", "timeout=5")],
            &[("expect", "100-continue")],
        ];
        for fields in cases {
            let mut h = HeaderMap::new();
            for (n, v) in fields {
                h.append(*n, HeaderValue::from_static(v));
            }
            h.append("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            assert_eq!(left, ["x-keep"], "{fields:?}");
        }
    }

    /// The client's `X-Forwarded-For` comes first when it has one; a blank
    /// or unreadable one is dropped rather than left as an empty hop.
    #[test]
    fn forwarded_for_appends_the_peer_to_a_real_list_only() {
        let peer = Peer::new(SocketAddr::from(([192, 0, 2, 7], 4000)), false);
        let value = |client: Option<&'static [u8]>| {
            let client = client.map(|c| HeaderValue::from_bytes(c).expect("value"));
            forwarded_for_value(client, &peer)
        };
        assert_eq!(value(None), "192.0.2.7");
        assert_eq!(value(Some(b"203.0.113.9")), "203.0.113.9, 192.0.2.7");
        for blank in [&b""[..], b"  ", b"\t", b"caf\xc3\xa9"] {
            assert_eq!(value(Some(blank)), "192.0.2.7", "{blank:?}");
        }
    }

    /// `forward` looks for these only when some header name starts with
    /// `x-`: a name outside that prefix would never be stripped.
    #[test]
    fn the_names_forward_strips_behind_its_x_check_start_with_x() {
        for n in [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            X_REQUEST_ID,
        ] {
            assert!(n.as_str().starts_with("x-"), "{n}");
        }
    }
}
