//! The client to the upstream.
//!
//! A plaintext HTTP/1.1 upstream — the sidecar case, the API on loopback —
//! gets the gateway's own connection pool: a LIFO stack of idle hyper
//! `SendRequest` handles. A connection goes back on the stack the moment its
//! response body has ended, from inside the request that used it, so
//! forwarding costs one lock to take a connection and one to return it; no
//! lazy-connect future, no pool-key hashing and no task spawned per request
//! to watch for idleness (what hyper-util's general-purpose client does).
//!
//! `https://` upstreams (HTTP/2 or HTTP/1.1 by ALPN) and h2c
//! (`upstream.http2`) keep hyper-util's pooled client.
//!
//! A request is retried on another connection when it was never written
//! (hyper hands it back unsent; the in-future client failed writing the
//! head). One more case, in-future client only: an idempotent request
//! without a body whose pooled connection was closed without a byte of
//! answer is sent once more, on a new connection (RFC 9112 §9.3.1; the
//! keep-alive race). Any other request that may have reached the upstream
//! is never sent twice.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;

use crate::config::Upstream;
use crate::h1;
use crate::proxy::{Added, RequestBody};

/// Idle connections kept per upstream; more are closed when they come back.
pub const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed: never lent again, and
/// closed by the pool's reaper within a third of this even without traffic.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type Pooled = Client<hyper_rustls::HttpsConnector<Counted>, RequestBody>;

/// hyper-util's TCP connector, counting the connections it establishes
/// (`scopegate_upstream_connections_opened_total` for `https://` and h2c
/// upstreams, as the own pool counts its own).
#[derive(Clone)]
pub struct Counted {
    inner: HttpConnector,
    opened: IntCounter,
}

impl tower_service::Service<Uri> for Counted {
    type Response = <HttpConnector as tower_service::Service<Uri>>::Response;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let opened = self.opened.clone();
        Box::pin(async move {
            let stream = connecting.await?;
            opened.inc();
            Ok(stream)
        })
    }
}

/// The client for one upstream setting. Cloning shares the connections.
#[derive(Clone)]
pub enum UpstreamClient {
    /// Plaintext HTTP/1.1: the gateway's own pool.
    Http1(Arc<Http1Pool>),
    /// `https://`, and h2c: hyper-util's pooled client.
    Pooled(Arc<PooledUpstream>),
}

/// hyper-util's client and the scheme and authority it needs in every URI
/// (it takes absolute-form).
pub struct PooledUpstream {
    client: Pooled,
    scheme: Scheme,
    authority: Authority,
}

/// Why a request did not get a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No connection could be made (refused, unresolvable, connect timeout,
    /// TLS handshake).
    Connect,
    /// A connection was made but the exchange failed.
    Protocol,
}

/// A connection lent to one request, returned with [`Checkin::give_back`]
/// once its response body has ended. Dropped instead, it closes.
pub struct Checkin {
    pool: Arc<Http1Pool>,
    tx: http1::SendRequest<RequestBody>,
}

impl Checkin {
    pub fn give_back(self) {
        self.pool.put(self.tx);
    }
}

impl UpstreamClient {
    /// The client for an upstream: HTTP/1.1, and HTTP/2 by ALPN on
    /// `https://` or by prior knowledge on plaintext when `upstream.http2`
    /// is set.
    ///
    /// `opened` counts the TCP connections opened to the upstream.
    pub fn build(u: &Upstream, opened: &IntCounter) -> Result<UpstreamClient, String> {
        if u.scheme == Scheme::HTTP && !u.http2 {
            return Ok(UpstreamClient::Http1(Arc::new(Http1Pool::new(
                &u.authority,
                u.connect_timeout,
                IDLE_TIMEOUT,
                MAX_IDLE,
                opened.clone(),
                raw_client_enabled(),
            ))));
        }
        let (http, builder) = crate::sources::connector_parts(u.ca.as_deref(), u.connect_timeout)?;
        let https = builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(Counted {
                inner: http,
                opened: opened.clone(),
            });
        let mut b = crate::sources::pooled();
        if u.http2 && u.scheme == Scheme::HTTP {
            b.http2_only(true);
        }
        Ok(UpstreamClient::Pooled(Arc::new(PooledUpstream {
            client: b.build(https),
            scheme: u.scheme.clone(),
            authority: u.authority.clone(),
        })))
    }

    /// Send `req`, whose URI is origin-form (`/path?query`) and which has no
    /// `Host` header nor any `x-airbrx-*` header; the client adds the
    /// upstream's `Host` and the `added` headers (the in-future client
    /// writes them first in the head, after the request line). With the own pool the
    /// returned [`Checkin`] must be given back when the body has ended.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
        added: &Added,
    ) -> Result<(Response<UpBody>, Option<Checkin>), SendError> {
        match self {
            UpstreamClient::Http1(pool) => {
                if pool.raw {
                    // No body, one that came whole with its head, or a small
                    // one the listener's own loop streams.
                    let (method, headers) = (req.method(), req.headers());
                    let eligible = match req.body() {
                        b if b.is_end_stream() => h1::eligible(method, headers, None),
                        RequestBody::Arrived(Some(b)) => h1::eligible(method, headers, Some(b)),
                        RequestBody::Streamed(b) => {
                            b.left() <= h1::MAX_STREAMED
                                && h1::eligible_length(method, headers, Some(b.left()))
                        }
                        _ => false,
                    };
                    if eligible {
                        let (parts, body) = req.into_parts();
                        let whole;
                        let body = match body {
                            RequestBody::Streamed(b) => h1::Outgoing::Streaming(b),
                            RequestBody::Arrived(Some(b)) => {
                                whole = b;
                                h1::Outgoing::Whole(&whole[..])
                            }
                            _ => h1::Outgoing::Whole(&[]),
                        };
                        let resp = pool.send_raw(&parts, added, body).await?;
                        return Ok((resp.map(UpBody::Raw), None));
                    }
                }
                added.insert_into(req.headers_mut());
                req.headers_mut()
                    .insert(header::HOST, pool.host_header.clone());
                let (resp, checkin) = pool.send(req).await?;
                Ok((resp.map(UpBody::Hyper), Some(checkin)))
            }
            UpstreamClient::Pooled(p) => {
                added.insert_into(req.headers_mut());
                let mut parts = std::mem::take(req.uri_mut()).into_parts();
                parts.scheme = Some(p.scheme.clone());
                parts.authority = Some(p.authority.clone());
                *req.uri_mut() = Uri::from_parts(parts).map_err(|_| SendError::Protocol)?;
                match p.client.request(req).await {
                    Ok(resp) => Ok((resp.map(UpBody::Hyper), None)),
                    Err(e) if e.is_connect() => Err(SendError::Connect),
                    Err(_) => Err(SendError::Protocol),
                }
            }
        }
    }

    /// Idle pooled connections (own pool only).
    pub fn idle(&self) -> Option<usize> {
        match self {
            UpstreamClient::Http1(pool) => Some(pool.idle_count()),
            UpstreamClient::Pooled(_) => None,
        }
    }
}

/// Plaintext HTTP/1.1 connections to one upstream.
pub struct Http1Pool {
    /// Host (brackets removed from an IPv6 literal) and port to connect to.
    host: String,
    port: u16,
    /// What hyper-util would send: the port only when it is not 80.
    host_header: HeaderValue,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// Whether bodiless requests, and bodies that came whole with their
    /// heads, take the in-future client ([`h1`]).
    raw: bool,
    /// Idle connections, most recently used at the back: hyper's, and the
    /// in-future client's.
    idle: IdleStack<http1::SendRequest<RequestBody>>,
    idle_raw: IdleStack<h1::Conn>,
    /// Whether the task that closes expired idle connections is running.
    reaper: AtomicBool,
    /// Connections opened (`scopegate_upstream_connections_opened_total`).
    opened: IntCounter,
}

/// Idle connections of one kind, most recently returned at the back: the
/// stack both clients' connections wait on between requests.
struct IdleStack<C> {
    q: Mutex<VecDeque<(C, Instant)>>,
}

impl<C> IdleStack<C> {
    fn new() -> IdleStack<C> {
        IdleStack {
            q: Mutex::new(VecDeque::new()),
        }
    }

    /// The most recently returned connection idle for less than `max_age`
    /// and still `open`; the stale ones above it are closed on the way.
    fn take(&self, now: Instant, max_age: Duration, open: impl Fn(&C) -> bool) -> Option<C> {
        let mut q = self.q.lock().ok()?;
        while let Some((c, since)) = q.pop_back() {
            if now.duration_since(since) < max_age && open(&c) {
                return Some(c);
            }
        }
        None
    }

    /// Back on top; the oldest is closed when `max` are already waiting.
    /// Expired ones are the reaper's.
    fn put(&self, c: C, now: Instant, max: usize) {
        let Ok(mut q) = self.q.lock() else {
            return;
        };
        if q.len() >= max {
            q.pop_front();
        }
        q.push_back((c, now));
    }

    /// Close every expired or closed connection.
    fn reap(&self, now: Instant, max_age: Duration, open: impl Fn(&C) -> bool) {
        if let Ok(mut q) = self.q.lock() {
            q.retain(|(c, since)| now.duration_since(*since) < max_age && open(c));
        }
    }

    fn len(&self) -> usize {
        self.q.lock().map(|q| q.len()).unwrap_or(0)
    }
}

/// RFC 9110 §9.2.2.
fn idempotent(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(m)
}

/// Chooses the client for plaintext HTTP/1.1 upstreams.
pub const UPSTREAM_CLIENT_ENV: &str = "SCOPEGATE_UPSTREAM_CLIENT";

/// `SCOPEGATE_UPSTREAM_CLIENT=hyper` sends every request through hyper's
/// client: the switch back if the in-future client ever misbehaves, and
/// the baseline for A/B measurements. Unset or `in-future` is the default;
/// anything else is an error (`serve` stops on it, naming the variable).
pub fn upstream_client_from_env() -> Result<bool, String> {
    crate::own_or_hyper(UPSTREAM_CLIENT_ENV, "in-future")
}

/// Whether the in-future client is on: [`upstream_client_from_env`], with
/// the default for a value `serve` would have refused (the library's
/// callers, such as tests, do not check it first).
pub fn raw_client_enabled() -> bool {
    upstream_client_from_env().unwrap_or(true)
}

/// A response body from either client.
pub enum UpBody {
    Hyper(Incoming),
    Raw(h1::RawBody),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = crate::proxy::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpBody::Raw(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Hyper(b) => b.is_end_stream(),
            UpBody::Raw(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Hyper(b) => b.size_hint(),
            UpBody::Raw(b) => b.size_hint(),
        }
    }
}

impl h1::Return for Http1Pool {
    fn give_back(&self, conn: h1::Conn) {
        self.put_raw(conn);
    }
}

impl Http1Pool {
    fn new(
        authority: &Authority,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        opened: IntCounter,
        raw: bool,
    ) -> Http1Pool {
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        let host_header = match authority.port_u16() {
            Some(p) if p != 80 => format!("{host}:{p}"),
            _ => host.to_owned(),
        };
        Http1Pool {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            // An Authority is always a valid header value.
            host_header: HeaderValue::from_str(&host_header)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            connect_timeout,
            idle_timeout,
            max_idle,
            raw,
            idle: IdleStack::new(),
            idle_raw: IdleStack::new(),
            reaper: AtomicBool::new(false),
            opened,
        }
    }

    async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Checkin), SendError> {
        loop {
            let (mut tx, reused) = match self.take() {
                Some(tx) => (tx, true),
                None => (self.connect().await?, false),
            };
            if reused && tx.ready().await.is_err() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        Checkin {
                            pool: self.clone(),
                            tx,
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe on another connection.
                    Some(back) if reused => req = back,
                    _ => return Err(SendError::Protocol),
                },
            }
        }
    }

    /// A request through the in-future client, with no body, with one
    /// whole in hand (written after the head), or with a small one the
    /// listener's own loop is still streaming. Retried on another
    /// connection when a reused one failed before the whole head was
    /// written (the upstream cannot have acted on it); and once, on a new
    /// connection, when a reused one was closed without a byte of answer,
    /// the request has no body and the method is idempotent (RFC 9110
    /// §9.2.2, RFC 9112 §9.3.1): the keep-alive race with an upstream whose
    /// idle timeout is shorter than the pool's, which nginx also retries.
    /// A request with a body is never sent twice once its head is whole,
    /// as with hyper's client.
    async fn send_raw(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        added: &Added,
        mut body: h1::Outgoing<'_, crate::server::streamed::Streamed>,
    ) -> Result<Response<h1::RawBody>, SendError> {
        let mut fresh_only = false;
        let bodiless = matches!(body, h1::Outgoing::Whole(b) if b.is_empty());
        loop {
            let pooled = if fresh_only { None } else { self.take_raw() };
            let (conn, reused) = match pooled {
                Some(c) => (c, true),
                None => (self.connect_raw().await?, false),
            };
            let back: Arc<dyn h1::Return> = self.clone();
            let head = std::iter::once((&header::HOST, &self.host_header)).chain(added.headers());
            let out = match &mut body {
                h1::Outgoing::Whole(b) => h1::Outgoing::Whole(b),
                h1::Outgoing::Streaming(b) => h1::Outgoing::Streaming(&mut *b),
            };
            match h1::exchange_body(conn, parts, head, out, back).await {
                Ok(resp) => return Ok(resp),
                Err((_, true)) if reused => continue,
                Err((h1::H1Error::NoAnswer, false))
                    if reused && bodiless && idempotent(&parts.method) =>
                {
                    tracing::debug!("reused upstream connection closed unanswered; retrying once");
                    fresh_only = true;
                }
                Err((e, _)) => {
                    tracing::debug!(error = %e, "upstream exchange failed");
                    return Err(SendError::Protocol);
                }
            }
        }
    }

    fn take_raw(&self) -> Option<h1::Conn> {
        self.idle_raw
            .take(Instant::now(), self.idle_timeout, h1::Conn::idle_ok)
    }

    fn put_raw(&self, conn: h1::Conn) {
        self.idle_raw.put(conn, Instant::now(), self.max_idle);
    }

    async fn connect_raw(self: &Arc<Self>) -> Result<h1::Conn, SendError> {
        self.start_reaper();
        let stream = tokio::time::timeout(self.connect_timeout, self.tcp())
            .await
            .map_err(|_| SendError::Connect)??;
        let _ = stream.set_nodelay(true);
        self.opened.inc();
        Ok(h1::Conn::new(stream))
    }

    /// Idle connections of both clients.
    fn idle_count(&self) -> usize {
        self.idle.len() + self.idle_raw.len()
    }

    /// The most recently returned connection that is still open and fresh.
    fn take(&self) -> Option<http1::SendRequest<RequestBody>> {
        self.idle
            .take(Instant::now(), self.idle_timeout, |tx| !tx.is_closed())
    }

    fn put(&self, tx: http1::SendRequest<RequestBody>) {
        if !tx.is_closed() {
            self.idle.put(tx, Instant::now(), self.max_idle);
        }
    }

    /// Close expired idle connections every third of the idle timeout, for
    /// as long as the pool exists (a reload to another upstream drops it).
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        let every = (self.idle_timeout / 3).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = weak.upgrade() else { break };
                pool.reap(Instant::now());
            }
        });
    }

    fn reap(&self, now: Instant) {
        self.idle.reap(now, self.idle_timeout, |tx| !tx.is_closed());
        self.idle_raw
            .reap(now, self.idle_timeout, h1::Conn::idle_ok);
    }

    async fn connect(self: &Arc<Self>) -> Result<http1::SendRequest<RequestBody>, SendError> {
        self.start_reaper();
        let stream = tokio::time::timeout(self.connect_timeout, self.tcp())
            .await
            .map_err(|_| SendError::Connect)??;
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| SendError::Connect)?;
        self.opened.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }

    /// Connect to the first address that answers, in resolver order.
    async fn tcp(&self) -> Result<tokio::net::TcpStream, SendError> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return tokio::net::TcpStream::connect(SocketAddr::new(ip, self.port))
                .await
                .map_err(|_| SendError::Connect);
        }
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|_| SendError::Connect)?;
        for addr in addrs {
            if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
                return Ok(s);
            }
        }
        Err(SendError::Connect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on loopback and its address as an authority.
    async fn listen() -> (tokio::net::TcpListener, Authority) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let authority = listener
            .local_addr()
            .expect("addr")
            .to_string()
            .parse()
            .expect("authority");
        (listener, authority)
    }

    /// A pool with the in-future client on, to `a`.
    fn new_pool(a: &Authority, idle_timeout: Duration, max_idle: usize) -> Http1Pool {
        Http1Pool::new(
            a,
            Duration::from_secs(1),
            idle_timeout,
            max_idle,
            counter(),
            true,
        )
    }

    /// A pool to a listener that accepts and holds connections (and closes
    /// them when `close` is notified).
    async fn pool(
        idle_timeout: Duration,
        max_idle: usize,
    ) -> (Arc<Http1Pool>, Arc<tokio::sync::Notify>) {
        let (listener, authority) = listen().await;
        let close = Arc::new(tokio::sync::Notify::new());
        let c = close.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    Ok((s, _)) = listener.accept() => held.push(s),
                    _ = c.notified() => held.clear(),
                }
            }
        });
        (
            Arc::new(new_pool(&authority, idle_timeout, max_idle)),
            close,
        )
    }

    fn counter() -> IntCounter {
        IntCounter::new("opened", "test").expect("counter")
    }

    fn idle(p: &Http1Pool) -> usize {
        p.idle.len()
    }

    #[test]
    fn the_idle_stack_lends_the_newest_fresh_open_one_and_caps() {
        let stack = IdleStack::new();
        let t0 = Instant::now();
        let age = Duration::from_secs(10);
        for c in 1..=3 {
            stack.put(c, t0, 2);
        }
        assert_eq!(stack.len(), 2, "capped: the oldest is closed");
        assert_eq!(stack.take(t0, age, |_| true), Some(3), "newest first");
        stack.put(3, t0, 2);
        // Not open: skipped and dropped on the way to an open one.
        assert_eq!(stack.take(t0, age, |&c| c != 3), Some(2));
        assert_eq!(stack.len(), 0);
        stack.put(4, t0, 2);
        assert_eq!(stack.take(t0 + age, age, |_| true), None, "expired");
        stack.put(5, t0, 2);
        stack.put(6, t0 + age, 2);
        stack.reap(t0 + age, age, |_| true);
        assert_eq!(
            stack.take(t0 + age, age, |_| true),
            Some(6),
            "reaped the expired"
        );
        assert_eq!(stack.len(), 0);
    }

    #[tokio::test]
    async fn expired_and_closed_connections_are_never_lent() {
        let (p, close) = pool(Duration::from_millis(100), 8).await;
        let tx = p.connect().await.expect("connect");
        p.put(tx);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(p.take().is_none(), "an expired connection was lent");

        // Without traffic, the reaper closes it.
        let tx = p.connect().await.expect("connect");
        p.put(tx);
        assert_eq!(idle(&p), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(idle(&p), 0, "an expired idle connection stayed open");

        let tx = p.connect().await.expect("connect");
        p.put(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        close.notify_one();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let closed = p
                .idle
                .q
                .lock()
                .expect("lock")
                .iter()
                .all(|(tx, _)| tx.is_closed());
            if closed {
                break;
            }
        }
        assert!(
            p.take().is_none(),
            "a connection the upstream closed was lent"
        );
    }

    fn idle_raw(p: &Http1Pool) -> usize {
        p.idle_raw.len()
    }

    #[tokio::test]
    async fn the_reaper_closes_what_expired_within_a_third_of_the_timeout_and_nothing_else() {
        let timeout = Duration::from_millis(1200);
        let (p, _close) = pool(timeout, 8).await;
        let start = Instant::now();
        // The first connection starts the reaper: a pass every 400 ms.
        let tx = p.connect().await.expect("connect");
        p.put(tx);
        let c = p.connect_raw().await.expect("connect");
        p.put_raw(c);
        // Past the first pass: both are fresh and open, and stay.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            (idle(&p), idle_raw(&p)),
            (1, 1),
            "the reaper closed live connections"
        );
        // Expired at 1.2 s; the pass at 1.6 s closes both. Waited for up
        // to 3 s, short of where a reaper nine times slower (a pass every
        // 3.6 s) would first run.
        while (idle(&p), idle_raw(&p)) != (0, 0) {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "expired connections outlived the next pass"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(start.elapsed() >= timeout, "closed before they expired");
    }

    #[tokio::test]
    async fn a_raw_connection_the_upstream_closed_is_never_lent() {
        let (p, close) = pool(Duration::from_secs(60), 8).await;
        let c = p.connect_raw().await.expect("connect");
        assert!(c.idle_ok(), "a fresh open connection must be usable");
        p.put_raw(c);
        tokio::time::sleep(Duration::from_millis(20)).await;
        close.notify_one();
        // The runtime sees the FIN on its next turn.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(idle_raw(&p), 1);
        assert!(
            p.take_raw().is_none(),
            "a connection the upstream closed was lent"
        );
        assert_eq!(idle_raw(&p), 0);
    }

    #[tokio::test]
    async fn raw_connection_with_unasked_bytes_is_never_lent() {
        let (listener, a) = listen().await;
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut s, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_millis(20)).await;
            // A response nobody asked for: the next request would read it.
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil")
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let p = Arc::new(new_pool(&a, IDLE_TIMEOUT, MAX_IDLE));
        let c = p.connect_raw().await.expect("connect");
        p.put_raw(c);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            p.take_raw().is_none(),
            "a connection with stray bytes was lent"
        );
    }

    #[test]
    fn host_header_matches_what_hyper_util_sends() {
        let cases = [
            ("127.0.0.1:8080", "127.0.0.1:8080", "127.0.0.1"),
            ("api.internal:80", "api.internal", "api.internal"),
            ("api.internal", "api.internal", "api.internal"),
            ("[::1]:9000", "[::1]:9000", "::1"),
        ];
        for (authority, header, host) in cases {
            let a: Authority = authority.parse().expect("authority");
            let p = new_pool(&a, IDLE_TIMEOUT, MAX_IDLE);
            assert_eq!(p.host_header, header, "{authority}");
            assert_eq!(p.host, host, "{authority}");
        }
    }
}
