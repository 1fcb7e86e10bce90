//! The proxy listener (SPEC §10): accepting, TLS, connection limits, idle
//! timeout and graceful drain.
//!
//! Owns connections, never requests: a request is handed to
//! [`Gateway::handle`] as soon as its head is parsed, by the own HTTP/1
//! loop (`fast`: plain HTTP/1.1, small bodies that came with the head) or
//! by hyper (everything else, and every request after the first the loop
//! hands over). Limits: `max_connections` (further connections wait in the
//! kernel's accept queue, sized to match: see [`bind`]), `max_header_bytes`,
//! `header_read_timeout` (slowloris: on HTTP/1 a request head must be
//! complete within it of the connection's start or of the previous
//! response's end, so it also bounds the wait for the next request on a
//! keep-alive connection; the connection is closed at once),
//! and `idle_timeout`: a connection with no request in progress and no
//! byte moved for that long is closed gracefully. Both are kept by one
//! clock task for all connections, not by timers per request or per
//! connection (see [`clock`]). On shutdown the listener stops accepting,
//! every connection is told to finish its requests and close, and `serve`
//! returns when all have, or when `drain_timeout` passes.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, TryAcquireError, watch};

use crate::proxy::{Gateway, Peer, PeerTexts, RequestBody};

mod accept;
mod fast;
pub mod streamed;
#[doc(hidden)]
pub use fast::{MAX_BODY, Parsed as ParsedHead, parse_head};

/// Per-connection state, shared by the IO wrapper, the service, the
/// response bodies, the connection future and the [`clock`].
///
/// Timekeeping stays off the per-request path: no timer is armed for a
/// request head or an idle period. The clock looks at these fields on its
/// tick and only then tells the connection to close (hyper's own
/// `header_read_timeout` armed, polled and dropped a timer for every
/// request: about 1.9k instructions, 5.7% of a proxied request, measured
/// with `bench/instructions.sh`).
struct Activity {
    started: Instant,
    /// Milliseconds since `started` of the last byte read or written.
    last: AtomicU64,
    /// Milliseconds since `started` at which the connection began waiting
    /// for a request head: its start, and the end of every response.
    head_since: AtomicU64,
    /// Requests whose response is not complete yet (head produced and body
    /// sent or dropped).
    active: AtomicUsize,
    /// The client opened with the HTTP/2 preface: no head timeout (hyper
    /// never had one for HTTP/2 either); the idle timeout still applies.
    h2: AtomicBool,
    /// What the clock asks of the connection: [`KEEP`], [`GRACEFUL`] or
    /// [`CLOSE`].
    verdict: AtomicU8,
    /// The connection task, woken when `verdict` changes.
    waker: AtomicWaker,
}

/// The connection may go on.
const KEEP: u8 = 0;
/// Finish the requests in progress, then close (drain, idle timeout).
const GRACEFUL: u8 = 1;
/// Close now (a request head not complete in `header_read_timeout`).
const CLOSE: u8 = 2;

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            started: Instant::now(),
            last: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            h2: AtomicBool::new(false),
            verdict: AtomicU8::new(KEEP),
            waker: AtomicWaker::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A response is complete: the wait for the next head starts now.
    fn response_done(&self) {
        let now = self.now_ms();
        self.last.store(now, Ordering::Relaxed);
        self.head_since.store(now, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Release);
    }

    fn tell(&self, verdict: u8) {
        self.verdict.fetch_max(verdict, Ordering::Release);
        self.waker.wake();
    }

    /// The clock's look at the connection at `now`: the verdict that is
    /// due, if any. Once the connection was told to finish (drain, idle)
    /// the idle rule is off; the head rule stays, so a client cannot hold a
    /// draining connection open with a trickled head.
    fn due(&self, now: Instant, idle: Duration, header: Duration) -> Option<u8> {
        let told = self.verdict.load(Ordering::Relaxed);
        // Acquire pairs with `response_done`: a zero count sees the
        // `head_since` stored before it.
        if told == CLOSE || self.active.load(Ordering::Acquire) > 0 {
            // Closing already, or busy: no deadline runs while a response
            // is in progress.
            return None;
        }
        let now = now.saturating_duration_since(self.started);
        let since =
            |at: &AtomicU64| now.saturating_sub(Duration::from_millis(at.load(Ordering::Relaxed)));
        if !self.h2.load(Ordering::Relaxed) && since(&self.head_since) >= header {
            return Some(CLOSE);
        }
        if told == KEEP && since(&self.last) >= idle {
            return Some(GRACEFUL);
        }
        None
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream that records when bytes move, and whether the client opened
/// with the HTTP/2 preface.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
    /// Bytes of the preface matched so far; `usize::MAX` once decided.
    preface: usize,
    /// Bytes read already and given back by [`Tracked::rewind`], read
    /// again before the stream's own.
    again: bytes::Bytes,
}

impl<T> Tracked<T> {
    fn new(inner: T, activity: Arc<Activity>) -> Tracked<T> {
        Tracked {
            inner,
            activity,
            preface: 0,
            again: bytes::Bytes::new(),
        }
    }

    /// Give back bytes read from this stream (and counted and sniffed
    /// then), so the next reader reads them first: how a connection goes
    /// from the own HTTP/1 loop to hyper.
    fn rewind(&mut self, read: bytes::Bytes) {
        self.again = read;
    }

    /// Follow the preface across reads, however the bytes are split. A
    /// method spelled `PRI` that is not the whole preface is HTTP/1 and
    /// keeps the head timeout.
    fn sniff(&mut self, read: &[u8]) {
        let want = &H2_PREFACE[self.preface..];
        let n = read.len().min(want.len());
        if read[..n] != want[..n] {
            self.preface = usize::MAX;
        } else if n == want.len() {
            self.preface = usize::MAX;
            self.activity.h2.store(true, Ordering::Relaxed);
        } else {
            self.preface += n;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.again.is_empty() {
            let n = this.again.len().min(buf.remaining());
            buf.put_slice(&this.again.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
            if this.preface != usize::MAX {
                this.sniff(&buf.filled()[before..]);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Counts a request as in progress from its head until its response is
/// complete: hyper drops the body after its last frame (or at once when
/// there is none), and the whole response if the client goes away.
struct ActiveGuard(Arc<Activity>);

impl ActiveGuard {
    fn new(activity: &Arc<Activity>) -> ActiveGuard {
        activity.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(activity.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.response_done();
    }
}

/// A response body that holds its request's [`ActiveGuard`].
struct Guarded<B> {
    inner: B,
    _guard: ActiveGuard,
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The proxy's listening socket on `addr`, with an accept queue of
/// `backlog` connections (the kernel caps it at `net.core.somaxconn`).
/// `TcpListener::bind` asks for 128, std's value: a burst of more new
/// connections than that (clients reconnecting after a deploy, a load
/// balancer's health checks meeting a traffic spike) has the kernel drop
/// their SYNs, and each waits out a one-second retransmission. The
/// gateway asks for `limits.max_connections`, as HAProxy's default
/// backlog follows `maxconn`.
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted gateway binds at once.
    socket.set_reuseaddr(true)?;
    // Linux gives it to every accepted socket (see `Nodelay`).
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// `TCP_NODELAY` on accepted connections: answers are written whole, so
/// Nagle's algorithm would only hold a response's last segment back. Set
/// on the listener by [`bind`], Linux gives it to every socket accepted
/// from it, and a `setsockopt` a connection (about 1% of the CPU of a
/// connection for a single request) is not needed. Looked at on the first
/// connection; if it was not passed on (a listener made elsewhere,
/// another system), it is set on each connection as before.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Nodelay {
    Unchecked,
    Inherited,
    EachConnection,
}

impl Nodelay {
    fn apply(&mut self, stream: &tokio::net::TcpStream) {
        match self {
            Nodelay::Inherited => {}
            Nodelay::EachConnection => {
                let _ = stream.set_nodelay(true);
            }
            Nodelay::Unchecked => {
                if stream.nodelay().unwrap_or(false) {
                    *self = Nodelay::Inherited;
                } else {
                    let _ = stream.set_nodelay(true);
                    *self = Nodelay::EachConnection;
                }
            }
        }
    }
}

/// The backlog [`bind`] asks for, from `limits.max_connections`.
pub fn backlog_for(max_connections: usize) -> u32 {
    u32::try_from(max_connections)
        .unwrap_or(u32::MAX)
        .clamp(128, i32::MAX as u32)
}

/// Serve the proxy on `listener` until `shutdown` resolves, then drain.
/// TLS is used when the serving generation configures it; each new
/// connection takes the certificate of the generation current when it is
/// accepted. Limits are read once, at start. Fails only when the
/// listener cannot be watched for connections (nothing was served).
pub async fn serve(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let options = ServeOptions::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "serving HTTP/1 with hyper alone");
        ServeOptions {
            h1_fast_path: false,
        }
    });
    serve_with(listener, gw, shutdown, options).await
}

/// How the listener serves HTTP/1.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Serve plain HTTP/1.1 requests (bodiless, or with a small body that
    /// came with the head) with the listener's own loop
    /// (`src/server/fast.rs`), and hand everything else to hyper. Off, hyper
    /// serves every request.
    pub h1_fast_path: bool,
}

/// The environment variable that chooses the HTTP/1 server:
/// `SCOPEGATE_HTTP1_SERVER=hyper` serves every request with hyper (the
/// switch back if the own loop ever misbehaves, and the baseline for A/B
/// measurements, as `SCOPEGATE_UPSTREAM_CLIENT=hyper` is for the client).
pub const HTTP1_SERVER_ENV: &str = "SCOPEGATE_HTTP1_SERVER";

impl ServeOptions {
    /// From `SCOPEGATE_HTTP1_SERVER`: unset or `own` (the default), or
    /// `hyper`. Anything else is an error naming the variable.
    pub fn from_env() -> Result<ServeOptions, String> {
        let h1_fast_path = crate::own_or_hyper(HTTP1_SERVER_ENV, "own")?;
        Ok(ServeOptions { h1_fast_path })
    }
}

/// [`serve`] with explicit options.
pub async fn serve_with(
    listener: TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    options: ServeOptions,
) -> io::Result<()> {
    let listener = accept::Listener::new(listener)?;
    let limits = gw.current().snapshot.limits.clone();
    let max = limits.max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    // The largest head either server reads (hyper's `max_buf_size` takes
    // at least 8 KB).
    let max_head = limits.max_header_bytes.max(8192);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The head timeout is the clock's (see `Activity`), not hyper's.
    builder
        .http1()
        .header_read_timeout(None::<Duration>)
        .max_buf_size(max_head)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    // Shared, not cloned for each connection: a connection borrows it.
    let builder = Arc::new(builder);
    let open = Arc::new(Open::default());
    let (clock_open, idle, header) = (
        open.clone(),
        limits.idle_timeout,
        limits.header_read_timeout,
    );
    tokio::spawn(supervise(move || {
        clock(clock_open.clone(), stop_rx.clone(), idle, header)
    }));
    tokio::pin!(shutdown);

    // Connections accepted since `shutdown` was last looked at.
    let mut unchecked = 0u32;
    let mut texts = PeerTexts::default();
    let mut nodelay = Nodelay::Unchecked;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => break,
            // `max_connections` are open: wait for one to end.
            Err(TryAcquireError::NoPermits) => tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = &mut shutdown => break,
            },
        };
        // `shutdown` is looked at whenever no connection is waiting, and
        // at least every 64 accepts in a flood: not on every accept (two
        // selects polled the signal future beside the permit and the
        // accept: about 1,100 instructions a connection).
        let accepted = std::future::poll_fn(|cx| {
            if unchecked >= 64 {
                unchecked = 0;
                if shutdown.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
            match listener.poll_accept(cx) {
                Poll::Ready(r) => {
                    unchecked += 1;
                    Poll::Ready(Some(r))
                }
                Poll::Pending => {
                    unchecked = 0;
                    shutdown.as_mut().poll(cx).map(|()| None)
                }
            }
        })
        .await;
        let (stream, peer) = match accepted {
            None => break,
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        nodelay.apply(&stream);
        let tls = gw.current().snapshot.tls.as_ref().map(|t| t.config.clone());
        // Registered here, before the next accept, so a drain (which
        // starts when this loop ends) reaches every connection.
        let activity = Activity::new();
        let conn = Conn {
            gw: gw.clone(),
            peer: texts.peer(peer, tls.is_some()),
            _place: open.register(&activity),
            activity,
            builder: builder.clone(),
            max_head,
            fast: options.h1_fast_path,
            _permit: permit,
        };
        // Boxed: a connection's future is several KB (both servers'
        // state), and a task holding it inline copied all of it when the
        // task was made and twice more when it ended. With a connection
        // for each request (`Connection: close`) that was a tenth of the
        // CPU; boxed (see `boxed`), it is not copied at all. Plaintext
        // and TLS are two futures so that a plaintext connection does not
        // carry the TLS one's larger state (5.4 against 10.6 KB).
        match tls {
            None => tokio::spawn(boxed(|| conn.run(stream))),
            Some(config) => tokio::spawn(boxed(|| conn.tls(stream, config))),
        };
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it closes: owning all of them
    // means the drain is complete.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain_timeout, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(drain_timeout = ?limits.drain_timeout, "drain timeout passed with connections still open");
    }
    Ok(())
}

/// One accepted connection, and what serving it needs.
struct Conn {
    gw: Arc<Gateway>,
    peer: Peer,
    activity: Arc<Activity>,
    /// Its place among the connections the [`clock`] looks at.
    _place: Place,
    builder: Arc<auto::Builder<TokioExecutor>>,
    max_head: usize,
    fast: bool,
    /// Held until the connection ends: `max_connections`, and the drain.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Conn {
    /// The TLS handshake, then [`Conn::run`]. The handshake counts against
    /// `header_read_timeout` as a head would; the first head's wait starts
    /// when it is done.
    async fn tls(self, stream: tokio::net::TcpStream, config: Arc<rustls::ServerConfig>) {
        let handshake = std::pin::pin!(tokio_rustls::TlsAcceptor::from(config).accept(stream));
        if let Some(Ok(stream)) = unless_closed(&self.activity, handshake).await {
            let now = self.activity.now_ms();
            self.activity.head_since.store(now, Ordering::Relaxed);
            self.activity.last.store(now, Ordering::Relaxed);
            self.run(stream).await;
        }
    }

    /// Serve the connection until it ends: first with the own HTTP/1 loop
    /// (when on), then, from the first request that loop does not serve,
    /// with hyper. The clock's verdicts reach both.
    async fn run<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            gw,
            peer,
            activity,
            _place,
            builder,
            max_head,
            fast,
            _permit,
        } = self;
        let mut io = Tracked::new(stream, activity.clone());
        if fast {
            let next = {
                let served = std::pin::pin!(fast::serve(&mut io, &gw, &peer, &activity, max_head));
                unless_closed(&activity, served).await
            };
            match next {
                None | Some(fast::Next::Close) => return,
                Some(fast::Next::Handoff(rest)) => io.rewind(rest),
            }
        }
        // Shared with hyper's service from here; the own loop borrowed it.
        let peer = Arc::new(peer);
        let svc_activity = activity.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let gw = gw.clone();
            let peer = peer.clone();
            let guard = ActiveGuard::new(&svc_activity);
            // Boxed: hyper's HTTP/2 server moves each request's future into
            // a task of its own, and unboxed that is several copies of a
            // 3.9 KB future (`Gateway::handle`'s) a request. Over h2c boxing
            // saves 4.5% of the instructions; on hyper's HTTP/1 server,
            // which keeps the future in one place, it costs 2.6% (an
            // allocation). The own HTTP/1 loop does not come here.
            boxed(|| async move {
                let resp = gw.handle(req.map(RequestBody::Incoming), &peer).await;
                Ok::<_, Infallible>(resp.map(|inner| Guarded {
                    inner,
                    _guard: guard,
                }))
            })
        });
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        drive(conn, &activity).await;
    }
}

/// `Box::pin(fut)`, with the future written into its allocation once
/// made. `Box::pin` made a connection's 5.4 KB future on the stack and
/// copied it into the box: 480 instructions a connection, 1.6% of one
/// that carries a single request (cachegrind, sg-close). Through
/// `Box::write` into room allocated first, the optimiser builds the future
/// in place. The language does not promise that: `bench/instructions.sh`
/// (sg-close, sg-h2) is what would see the copy come back.
#[inline(always)]
fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Run `fut` until it ends (`Some` of its output), or until the clock
/// says to close at once (`None`). The clock wakes the connection's task
/// when its verdict changes. `fut` is pinned where the caller made it:
/// taken by value, a 4.7 KB `fast::serve` future was copied into this
/// one's state (sg-close 35,075 -> 45,267 instructions).
async fn unless_closed<F: Future>(activity: &Activity, mut fut: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        activity.waker.register(cx.waker());
        if activity.verdict.load(Ordering::Acquire) == CLOSE {
            return Poll::Ready(None);
        }
        fut.as_mut().poll(cx).map(Some)
    })
    .await
}

/// Run one hyper connection until it ends, or until the clock says to
/// close: gracefully (requests in progress finish first) or at once. No
/// timer and no channel is polled here, so a request's wake-ups cost the
/// connection only two atomic loads.
async fn drive<C>(conn: C, activity: &Activity)
where
    C: Future + GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    std::future::poll_fn(|cx| {
        activity.waker.register(cx.waker());
        match activity.verdict.load(Ordering::Acquire) {
            CLOSE => return Poll::Ready(()),
            GRACEFUL if !closing => {
                conn.as_mut().shut_down();
                closing = true;
            }
            _ => {}
        }
        conn.as_mut().poll(cx).map(|_| ())
    })
    .await;
}

/// Every open connection's [`Activity`], for the [`clock`].
#[derive(Default)]
struct Open {
    slots: std::sync::Mutex<slab::Slab<Arc<Activity>>>,
    /// Told when a connection arrives at an empty list: while none is
    /// open the clock does not tick, so an idle gateway never wakes.
    first: tokio::sync::Notify,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, slab::Slab<Arc<Activity>>> {
        // Nothing panics while holding it; if something ever did, the
        // list is still whole (each change is one slab call).
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(self: &Arc<Open>, activity: &Arc<Activity>) -> Place {
        let mut slots = self.lock();
        let key = slots.insert(activity.clone());
        if slots.len() == 1 {
            // Kept as a permit if the clock is not waiting yet.
            self.first.notify_one();
        }
        drop(slots);
        Place {
            open: self.clone(),
            key,
        }
    }
}

/// A connection's place in [`Open`], given up when the connection ends
/// (however its future ends: finished, or dropped with the runtime).
struct Place {
    open: Arc<Open>,
    key: usize,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.lock().try_remove(self.key);
    }
}

/// The tick of the [`clock`]: a tenth of the shorter timeout, between
/// 10 ms and a second. A timeout is acted on within one tick of passing
/// (with the defaults, 10 s and 60 s: within a second), never before.
fn tick_for(idle: Duration, header: Duration) -> Duration {
    (idle.min(header) / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// All connections' timekeeper: on every tick it looks at each open
/// connection and tells those whose deadline has passed to close
/// (`idle` without a byte and without a request: gracefully; `header`
/// waiting for a complete request head on HTTP/1, or for the TLS
/// handshake: at once); on drain it tells every connection to finish. It
/// sleeps without ticking while no connection is open, and ends once
/// draining and no connection is left.
///
/// One task and one timer for the listener, instead of a task with its
/// own timer for each connection: that cost a connection about 2.9k
/// instructions (spawn, timer, abort) and, as often as not, a write to
/// the runtime's eventfd to wake its driver for the new timer
/// (`bench/instructions.sh`'s `sg-close`; strace).
async fn clock(open: Arc<Open>, mut stop: watch::Receiver<bool>, idle: Duration, header: Duration) {
    let mut ticks = tokio::time::interval(tick_for(idle, header));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = false;
    loop {
        let empty = open.lock().is_empty();
        if draining && empty {
            return;
        }
        tokio::select! {
            changed = stop.changed(), if !draining => {
                if changed.is_err() || *stop.borrow() {
                    draining = true;
                    for (_, activity) in open.lock().iter() {
                        activity.tell(GRACEFUL);
                    }
                }
            }
            _ = ticks.tick(), if !empty => {}
            () = open.first.notified(), if empty => {
                // The newcomer's first deadline is a whole timeout away.
                ticks.reset();
                continue;
            }
        }
        let now = Instant::now();
        for (_, activity) in open.lock().iter() {
            if let Some(verdict) = activity.due(now, idle, header) {
                activity.tell(verdict);
            }
        }
    }
}

/// Run the task `start` makes until it returns, and start it again each
/// time it panics. For the [`clock`]: every connection's timeouts hang on
/// it, so a panic there would quietly take the slowloris guard away from
/// all of them, where a connection's own panic ends only that connection.
/// None is known; this is the net under one. A pause before each restart
/// keeps a task that panics at once from spinning.
async fn supervise<F, Fut>(mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match tokio::spawn(start()).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                tracing::error!("the connection clock panicked; starting it again");
                tokio::time::sleep(RESTART_PAUSE).await;
            }
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        }
    }
}

const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// The graceful-shutdown hook of hyper-util's connection types.
trait GracefulConnection {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulConnection for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every accepted connection ends up with `TCP_NODELAY`: passed on from
    /// [`bind`]'s listener (on Linux, with no call a connection), or set on
    /// each connection when a listener did not have it.
    #[tokio::test]
    async fn accepted_connections_get_nodelay_from_the_listener_or_each_time() {
        let ours = bind(([127, 0, 0, 1], 0).into(), 128).expect("bind");
        let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        #[cfg(target_os = "linux")]
        let from_ours = Nodelay::Inherited;
        #[cfg(not(target_os = "linux"))]
        let from_ours = Nodelay::EachConnection;
        for (listener, after) in [(ours, from_ours), (plain, Nodelay::EachConnection)] {
            let mut nodelay = Nodelay::Unchecked;
            let addr = listener.local_addr().expect("addr");
            for i in 0..3 {
                let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let (stream, _) = listener.accept().await.expect("accept");
                nodelay.apply(&stream);
                assert_eq!(nodelay, after, "{addr} {i}");
                assert!(stream.nodelay().expect("nodelay"), "{addr} {i}");
            }
        }
    }

    #[tokio::test]
    async fn a_supervised_task_that_panics_is_started_again_until_it_returns() {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = runs.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            supervise(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert!(n >= 2, "planted panic {n}");
                }
            }),
        )
        .await
        .expect("supervise returned once the task did");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    /// The clock a listener runs is supervised: a panic in it leaves
    /// connections with their timeouts.
    #[tokio::test]
    async fn the_clock_keeps_connections_timed_after_a_panic() {
        let open = Arc::new(Open::default());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let activity = Activity::new();
        let _place = open.register(&activity);
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = started.clone();
        let (o, header) = (open.clone(), Duration::from_millis(50));
        tokio::spawn(supervise(move || {
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            let (o, stop) = (o.clone(), stop_rx.clone());
            async move {
                // The first run dies at once, as a clock with a bug would.
                assert!(!first, "planted panic");
                clock(o, stop, Duration::from_secs(60), header).await;
            }
        }));
        // The connection never sends a head: only a running clock closes it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while activity.verdict.load(Ordering::Acquire) != CLOSE {
            assert!(
                Instant::now() < deadline,
                "no clock closed the silent connection"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    fn sniffed(parts: &[&[u8]]) -> (bool, bool) {
        let mut t = Tracked::new((), Activity::new());
        for p in parts {
            if t.preface != usize::MAX {
                t.sniff(p);
            }
        }
        (
            t.activity.h2.load(Ordering::Relaxed),
            t.preface == usize::MAX,
        )
    }

    const IDLE: Duration = Duration::from_secs(60);
    const HEAD: Duration = Duration::from_secs(10);

    fn at(a: &Activity, ms: u64) -> Option<u8> {
        a.due(a.started + Duration::from_millis(ms), IDLE, HEAD)
    }

    #[test]
    fn a_head_not_complete_in_time_closes_the_connection_at_once() {
        let a = Activity::new();
        assert_eq!(at(&a, 0), None);
        assert_eq!(at(&a, 9_999), None);
        assert_eq!(at(&a, 10_000), Some(CLOSE));
        // The wait starts again when a response ends.
        a.head_since.store(30_000, Ordering::Relaxed);
        a.last.store(30_000, Ordering::Relaxed);
        assert_eq!(at(&a, 39_999), None);
        assert_eq!(at(&a, 40_000), Some(CLOSE));
        // Also when the connection is finishing already: a trickled head
        // cannot hold a draining connection open.
        a.tell(GRACEFUL);
        assert_eq!(at(&a, 40_000), Some(CLOSE));
    }

    #[test]
    fn a_quiet_connection_finishes_gracefully_and_a_busy_one_is_left_alone() {
        let a = Activity::new();
        a.h2.store(true, Ordering::Relaxed);
        // HTTP/2 has no head rule; quiet for `idle`, it is told to finish.
        assert_eq!(at(&a, 59_999), None);
        assert_eq!(at(&a, 60_000), Some(GRACEFUL));
        a.last.store(50_000, Ordering::Relaxed);
        assert_eq!(at(&a, 60_000), None);
        assert_eq!(at(&a, 110_000), Some(GRACEFUL));
        // A response in progress stops both rules.
        a.active.fetch_add(1, Ordering::Relaxed);
        assert_eq!(at(&a, 1_000_000), None);
        a.response_done();
        // Told once, it is not told again; told to close, nothing more.
        a.tell(GRACEFUL);
        assert_eq!(at(&a, 1_000_000), None);
        let b = Activity::new();
        b.tell(CLOSE);
        assert_eq!(at(&b, 1_000_000), None);
    }

    #[test]
    fn a_connection_leaves_the_clocks_list_when_it_ends() {
        let open = Arc::new(Open::default());
        let (a, b) = (Activity::new(), Activity::new());
        let first = open.register(&a);
        let second = open.register(&b);
        assert_eq!(open.lock().len(), 2);
        drop(first);
        assert_eq!(open.lock().len(), 1);
        assert!(Arc::ptr_eq(open.lock().iter().next().expect("one").1, &b));
        drop(second);
        assert!(open.lock().is_empty());
        assert_eq!(Arc::strong_count(&a), 1);
    }

    #[test]
    fn the_clock_ticks_at_a_tenth_of_the_shorter_timeout_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(tick_for(ms(60_000), ms(10_000)), ms(1_000));
        assert_eq!(tick_for(ms(300), ms(30_000)), ms(30));
        assert_eq!(tick_for(ms(30_000), ms(300)), ms(30));
        assert_eq!(tick_for(ms(50), ms(50)), ms(10));
        assert_eq!(tick_for(ms(3_600_000), ms(600_000)), ms(1_000));
    }

    #[test]
    fn the_http2_preface_is_recognised_however_it_is_split() {
        for cut in 0..=H2_PREFACE.len() {
            for cut2 in cut..=H2_PREFACE.len() {
                let (a, rest) = H2_PREFACE.split_at(cut);
                let (b, c) = rest.split_at(cut2 - cut);
                assert_eq!(
                    sniffed(&[a, b, c, b"\0\0\x12\x04"]),
                    (true, true),
                    "{cut} {cut2}"
                );
            }
        }
        // The preface followed by the first frame in the same read.
        let mut joined = H2_PREFACE.to_vec();
        joined.extend_from_slice(b"\0\0\x12\x04\0\0\0\0\0");
        assert_eq!(sniffed(&[&joined]), (true, true));
    }

    #[test]
    fn anything_short_of_the_whole_preface_is_http1_or_undecided() {
        assert_eq!(sniffed(&[b"GET / HTTP/1.1\r\n"]), (false, true));
        assert_eq!(sniffed(&[b"PRI /x HTTP/1.1\r\n"]), (false, true));
        assert_eq!(
            sniffed(&[b"PRI * HTTP/2.0\r\n\r\nSX\r\n\r\n"]),
            (false, true)
        );
        // A prefix alone decides nothing yet: the head timeout still runs.
        assert_eq!(sniffed(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n"]), (false, false));
        assert_eq!(sniffed(&[b"P", b"R", b"I"]), (false, false));
    }
}
