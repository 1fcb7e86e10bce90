//! A minimal, fast HTTP/1.1 upstream for bench/load.sh: answers every
//! request with 200 and a 2-byte body, keep-alive, once it has read the
//! request's body.
//!
//! Usage: fast_upstream ADDR [WORKERS]

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:18081".into());
    let workers = args.next().and_then(|w| w.parse().ok()).unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        // An accept queue of 4,096 (the kernel's default cap, which the
        // gateway's own default of 10,000 meets): tokio's 128 overflowed
        // when a cold gateway opened a connection for each of 256 clients
        // at once, and each dropped SYN cost its request a one-second
        // retransmission.
        let listener = scopegate::server::bind(addr.parse().expect("address"), 4096).expect("bind");
        eprintln!("fast_upstream listening on {addr}");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                // The body is read before the answer, as an API reads it:
                // answered first, a body over one read ends the connection
                // (hyper's server cannot drain it), for every proxy alike.
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
