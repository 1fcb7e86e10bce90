//! The HTTPS client that the token sources (JWKS, RFC 7662 introspection)
//! share: rustls with the web PKI roots or an operator CA, a connect and a
//! total timeout, and a cap on the response body so a hostile or broken key
//! server cannot make the gateway allocate without bound.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Largest response body read from a key server or introspection endpoint.
pub const MAX_BODY: usize = 1024 * 1024;

pub type SourceClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A TCP connector and the rustls half of an HTTPS connector, shared by the
/// upstream client and the token sources: web PKI roots, or `roots` instead
/// when given (an operator CA).
pub fn connector_parts(
    roots: Option<&rustls::RootCertStore>,
    connect_timeout: Duration,
) -> Result<
    (
        HttpConnector,
        hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>,
    ),
    String,
> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match roots {
        None => builder
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| format!("TLS setup: {e}"))?,
        Some(roots) => {
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS setup: {e}"))?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            builder.with_tls_config(tls)
        }
    };
    Ok((http, builder))
}

/// An HTTPS-only client. `roots` replaces the web PKI roots when given.
pub fn client(
    roots: Option<&rustls::RootCertStore>,
    connect_timeout: Duration,
) -> Result<SourceClient, String> {
    let (http, builder) = connector_parts(roots, connect_timeout)?;
    let https = builder
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(pooled().build(https))
}

/// The client settings every pool here shares: tokio timers, idle
/// connections kept 90 s.
pub fn pooled() -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90));
    b
}

/// Why a fetch failed, as a bounded metric label and a log message that
/// never carries a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    pub kind: &'static str,
    pub message: String,
}

impl FetchError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> FetchError {
        FetchError {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Send `req` and read a 200 response's body, all within `timeout`.
pub async fn fetch(
    client: &SourceClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Bytes, FetchError> {
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| FetchError::new("connect", error_chain(&e)))?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(FetchError::new("status", format!("HTTP {status}")));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| FetchError::new("body", e.to_string()))?;
        Ok(body.to_bytes())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::new(
            "timeout",
            format!("no answer in {timeout:?}"),
        )),
    }
}

/// An error and its sources on one line (hyper's top-level message alone is
/// "client error (Connect)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error wrapping another, with what it wraps as its source.
    #[derive(Debug)]
    struct Wraps(&'static str, Option<Box<dyn std::error::Error + 'static>>);

    impl std::fmt::Display for Wraps {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wraps {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref()
        }
    }

    /// A failed fetch's message carries every cause, not hyper's
    /// "client error (Connect)" alone.
    #[test]
    fn an_error_is_written_with_all_its_sources() {
        let refused = Wraps("connection refused", None);
        let tcp = Wraps("tcp connect error", Some(Box::new(refused)));
        let e = Wraps("client error (Connect)", Some(Box::new(tcp)));
        assert_eq!(
            error_chain(&e),
            "client error (Connect): tcp connect error: connection refused"
        );
        assert_eq!(error_chain(&Wraps("alone", None)), "alone");
    }
}
