//! The admin listener (SPEC §9): `/metrics`, `/healthz`, `/readyz`, `/config`.
//!
//! Owns the operator-facing HTTP endpoints on their own address. It only
//! reads: the metrics registry and the serving generation. It must never
//! expose a secret: `/config` reports counts and file hashes, not contents.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;

use crate::proxy::Gateway;

/// Answer one admin request.
pub fn handle<B>(gw: &Gateway, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(gw.render_metrics())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        // A gateway object exists only once a valid generation has loaded.
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/config" => {
            let g = gw.current();
            let s = &g.snapshot;
            let loaded_at = time::OffsetDateTime::from(s.loaded_at)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let body = json!({
                "generation": g.number,
                "loaded_at": loaded_at,
                "source": s.source,
                "mode": s.mode,
                "files": s.files,
                "counts": {
                    "routes": s.routes.len(),
                    "tags": s.tags.len(),
                    "plans": s.plans.len(),
                    "accounts": s.accounts.len(),
                    "tenants": s.tenants.len(),
                    "pats": s.pats.len(),
                    "jwt_keys": s.jwt.keys.len(),
                },
                "token_sources": {
                    "jwks": s.jwt.jwks.as_ref().map(|j| j.status()),
                    "introspection": s.introspection.as_ref().map(|i| json!({
                        "endpoint": i.describe(),
                        "cached": i.cached(),
                    })),
                },
                "warnings": s.warnings,
                "last_reload_error": gw.last_error(),
            });
            let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        p => {
            // `/tokens/{id}/usage`; by stripping, as "/tokens/usage" both
            // starts and ends so with no room for an id between.
            let Some(raw) = p
                .strip_prefix("/tokens/")
                .and_then(|r| r.strip_suffix("/usage"))
            else {
                return text(StatusCode::NOT_FOUND, "not found\n");
            };
            let id = percent_decode(raw);
            let g = gw.current();
            let report = match (&gw.usage, id) {
                (Some(book), Some(id)) => book.report(&id, &g.snapshot),
                _ => None,
            };
            match report {
                Some(r) => {
                    let body = serde_json::to_vec(&r).unwrap_or_default();
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                None if gw.usage.is_none() => text(StatusCode::NOT_FOUND, "usage is disabled\n"),
                None => text(
                    StatusCode::NOT_FOUND,
                    "no usage recorded for this token id\n",
                ),
            }
        }
    }
}

/// `%XX` escapes decoded; `None` for a bad escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Two hex digits: `from_str_radix` alone would take "+5".
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serve the admin endpoints until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = handle(&gw, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decode_takes_two_hex_digits_and_utf_8_only() {
        for (raw, want) in [
            ("tok_abc", Some("tok_abc")),
            ("tok%5Fabc", Some("tok_abc")),
            ("%c3%a9", Some("\u{e9}")),
            ("", Some("")),
            // Bad escapes: short, not hex, a sign, and bytes that are not
            // UTF-8.
            ("tok%5", None),
            ("%", None),
            ("%zz", None),
            ("%+5", None),
            ("%-5", None),
            ("%ff", None),
        ] {
            assert_eq!(percent_decode(raw).as_deref(), want, "{raw}");
        }
    }
}
