//! A paced HTTP/1.1 load generator for bench/load.sh: sends requests at a
//! fixed total rate over keep-alive connections and reports latency
//! percentiles. When the server made a request late (the previous response
//! on its connection finished after it was due), its latency counts from
//! when it was due, so a stall shows up as latency instead of as fewer
//! requests (the correction wrk2 makes; Debian has no wrk2). Otherwise it
//! counts from the actual send: tokio's timer fires up to 1 ms late, and
//! that slop is the generator's, not the server's.
//!
//! Usage: paced HOST:PORT PATH RATE SECONDS CONNECTIONS [BEARER_TOKEN]
//! Prints: `rate=<achieved req/s> p50_us=<n> p99_us=<n> p999_us=<n> errors=<n>`

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: paced HOST:PORT PATH RATE SECONDS CONNECTIONS [BEARER_TOKEN]");
        std::process::exit(2);
    }
    let addr = args[0].clone();
    let path = args[1].clone();
    let rate: f64 = args[2].parse().expect("rate");
    let seconds: f64 = args[3].parse().expect("seconds");
    let conns: usize = args[4].parse().expect("connections");
    let token = args.get(5).cloned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (lat, errors, elapsed) = rt.block_on(async move {
        let interval = Duration::from_secs_f64(conns as f64 / rate);
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let end = start + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (addr, path, token) = (addr.clone(), path.clone(), token.clone());
            // Stagger the connections across one interval.
            let first = start + interval.mul_f64(c as f64 / conns as f64);
            tasks.push(tokio::spawn(async move {
                let mut lat: Vec<u32> = Vec::new();
                let mut errors = 0usize;
                let connect = || async {
                    let stream = tokio::net::TcpStream::connect(&addr)
                        .await
                        .expect("connect");
                    let _ = stream.set_nodelay(true);
                    let (sender, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream))
                            .await
                            .expect("handshake");
                    tokio::spawn(conn);
                    sender
                };
                let mut sender = connect().await;
                let mut i = 0u32;
                let mut last_done = first;
                loop {
                    let intended = first + interval * i;
                    if intended >= end {
                        break;
                    }
                    tokio::time::sleep_until(intended).await;
                    let from = if last_done > intended {
                        intended
                    } else {
                        tokio::time::Instant::now()
                    };
                    let mut req = http::Request::get(path.as_str()).header("host", "bench");
                    if let Some(t) = &token {
                        req = req.header("authorization", format!("Bearer {t}"));
                    }
                    let req = req.body(Empty::<Bytes>::new()).expect("request");
                    // A server may close a keep-alive connection between
                    // requests (nginx after keepalive_requests): reconnect
                    // and send again, as wrk does.
                    if sender.ready().await.is_err() {
                        sender = connect().await;
                    }
                    match sender.send_request(req).await {
                        Ok(resp) if resp.status() == 200 => {
                            let _ = resp.into_body().collect().await;
                        }
                        _ => {
                            errors += 1;
                            sender = connect().await;
                        }
                    }
                    last_done = tokio::time::Instant::now();
                    let took = last_done.saturating_duration_since(from);
                    lat.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                    i += 1;
                }
                (lat, errors)
            }));
        }
        let began = Instant::now();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.expect("task");
            all.extend(l);
            errors += e;
        }
        (all, errors, began.elapsed())
    });
    let mut lat = lat;
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "rate={:.0} p50_us={} p99_us={} p999_us={} errors={}",
        lat.len() as f64 / elapsed.as_secs_f64().max(seconds),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        errors
    );
}
