//! The proxy listener (SPEC §10): accepting, TLS, connection limits, idle
//! timeout and graceful drain.
//!
//! Owns connections, never requests: a request is handed to
//! [`Gateway::handle`] as soon as hyper has parsed its head. Limits:
//! `max_connections` (further connections wait in the kernel's accept
//! queue), `max_header_bytes`, `header_read_timeout` (slowloris; on HTTP/1
//! hyper also applies it while a keep-alive connection waits for its next
//! request), and `idle_timeout`: a connection with no request in progress
//! and no byte moved for that long is closed gracefully. On shutdown the
//! listener stops accepting, every connection is told to finish its
//! requests and close, and `serve` returns when all have, or when
//! `drain_timeout` passes.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::proxy::{Gateway, Peer};

/// Per-connection activity, shared by the IO wrapper, the service and the
/// idle watchdog.
struct Activity {
    started: Instant,
    /// Milliseconds since `started` of the last byte read or written.
    last: AtomicU64,
    /// Requests whose response head has not been produced yet.
    active: AtomicUsize,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            started: Instant::now(),
            last: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.started.elapsed();
        now.saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// A stream that records when bytes move.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
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

/// Decrements the active-request count when the handler finishes (or is
/// dropped because the client went away).
struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Serve the proxy on `listener` until `shutdown` resolves, then drain.
/// TLS is used when the serving generation configures it; each new
/// connection takes the certificate of the generation current when it is
/// accepted. Limits are read once, at start.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    let limits = gw.current().snapshot.limits.clone();
    let max = limits.max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let tls = gw.current().snapshot.tls.as_ref().map(|t| t.config.clone());
        let gw = gw.clone();
        let builder = builder.clone();
        let stop = stop_rx.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let activity = Activity::new();
            let peer = Arc::new(Peer::new(peer, tls.is_some()));
            let svc_activity = activity.clone();
            let svc = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                let peer = peer.clone();
                svc_activity.active.fetch_add(1, Ordering::Relaxed);
                let guard = ActiveGuard(svc_activity.clone());
                async move {
                    let resp = gw.handle(req, &peer).await;
                    drop(guard);
                    Ok::<_, Infallible>(resp)
                }
            });
            match tls {
                None => {
                    let io = Tracked {
                        inner: stream,
                        activity: activity.clone(),
                    };
                    let conn = builder.serve_connection(TokioIo::new(io), svc);
                    drive(conn, stop, activity, limits.idle_timeout).await;
                }
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                            .await
                    else {
                        return;
                    };
                    let io = Tracked {
                        inner: stream,
                        activity: activity.clone(),
                    };
                    let conn = builder.serve_connection(TokioIo::new(io), svc);
                    drive(conn, stop, activity, limits.idle_timeout).await;
                }
            }
            drop(permit);
        });
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
}

/// Run one connection to completion, shutting it down gracefully on drain or
/// when it has been idle for `idle`.
async fn drive<C>(conn: C, mut stop: watch::Receiver<bool>, activity: Arc<Activity>, idle: Duration)
where
    C: Future + GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        // With a request in progress the connection is not idle, however
        // quiet its bytes are: look again after a whole period.
        let wait = if activity.active.load(Ordering::Relaxed) > 0 {
            idle
        } else {
            idle.saturating_sub(activity.idle_for())
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            changed = stop.changed(), if !closing => {
                if changed.is_err() || *stop.borrow() {
                    conn.as_mut().shut_down();
                    closing = true;
                }
            }
            _ = tokio::time::sleep(wait), if !closing => {
                if activity.active.load(Ordering::Relaxed) == 0 && activity.idle_for() >= idle {
                    conn.as_mut().shut_down();
                    closing = true;
                }
            }
        }
    }
}

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
