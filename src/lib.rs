//! scopegate: a reverse-proxy authorization gateway.
//!
//! Every request goes through named phases in a fixed order (see
//! [`decision`]): check path → match route → authenticate → authorize →
//! forward. Configuration is compiled into one immutable [`config::Snapshot`]
//! and published as a [`proxy::Generation`] with a single `ArcSwap` store.
//!
//! [`serve`] runs the proxy listener; tests and `main` both call it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod decision;
pub mod error;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod scope;
pub mod tls;
pub mod token;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use config::{ConfigErrors, Snapshot};
pub use proxy::Gateway;

/// Serve the proxy on `listener` until `shutdown` resolves, then stop
/// accepting and let requests in flight finish for up to the configured
/// drain timeout. TLS is used when the serving generation configures it;
/// each new connection takes the certificate of the generation current when
/// it is accepted.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    let limits = gw.current().snapshot.limits.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
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
        let watcher = graceful.watcher();
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let is_tls = tls.is_some();
            let svc = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(gw.handle(req, peer, is_tls).await) }
            });
            match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        _ => return,
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_timeout = ?limits.drain_timeout,
            "drain timeout passed with requests still in flight"
        );
    }
}
