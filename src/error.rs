//! Denials and gateway errors → HTTP responses (SPEC §6).
//!
//! Owns the one table from a [`Reason`] to its status, `error` code and
//! human message, the RFC 6750 `WWW-Authenticate` header, and the JSON body.
//! Nothing else in the crate chooses a status code for a denial. A body never
//! contains the token or anything derived from it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::scope::{Axis, Refusal};
use crate::token::AuthError;

/// Every `reason` in SPEC §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    BadPath,
    UnmappedRoute,
    MethodNotAllowed,
    UnknownTenant,
    UnknownAccount,
    MissingToken,
    BadAuthorization,
    MalformedToken,
    UnknownToken,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    Revoked,
    Method,
    Path,
    Tenant,
    Account,
    Plan,
    UpstreamUnavailable,
    UpstreamTimeout,
    KeySourceUnavailable,
    TokenSourceUnavailable,
}

impl Reason {
    /// Every reason, for metrics pre-registration and tests.
    pub const ALL: [Reason; 25] = [
        Reason::BadPath,
        Reason::UnmappedRoute,
        Reason::MethodNotAllowed,
        Reason::UnknownTenant,
        Reason::UnknownAccount,
        Reason::MissingToken,
        Reason::BadAuthorization,
        Reason::MalformedToken,
        Reason::UnknownToken,
        Reason::UnknownKey,
        Reason::BadSignature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::WrongIssuer,
        Reason::WrongAudience,
        Reason::Revoked,
        Reason::Method,
        Reason::Path,
        Reason::Tenant,
        Reason::Account,
        Reason::Plan,
        Reason::UpstreamUnavailable,
        Reason::UpstreamTimeout,
        Reason::KeySourceUnavailable,
        Reason::TokenSourceUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadPath => "bad_path",
            Reason::UnmappedRoute => "unmapped_route",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::UnknownTenant => "unknown_tenant",
            Reason::UnknownAccount => "unknown_account",
            Reason::MissingToken => "missing_token",
            Reason::BadAuthorization => "bad_authorization",
            Reason::MalformedToken => "malformed_token",
            Reason::UnknownToken => "unknown_token",
            Reason::UnknownKey => "unknown_key",
            Reason::BadSignature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::WrongAudience => "wrong_audience",
            Reason::Revoked => "revoked",
            Reason::Method => "method",
            Reason::Path => "path",
            Reason::Tenant => "tenant",
            Reason::Account => "account",
            Reason::Plan => "plan",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::KeySourceUnavailable => "key_source_unavailable",
            Reason::TokenSourceUnavailable => "token_source_unavailable",
        }
    }

    pub fn status(self) -> StatusCode {
        use Reason::*;
        match self {
            BadPath | BadAuthorization => StatusCode::BAD_REQUEST,
            UnmappedRoute => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            UnknownTenant | UnknownAccount | Method | Path | Tenant | Account | Plan => {
                StatusCode::FORBIDDEN
            }
            MissingToken | MalformedToken | UnknownToken | UnknownKey | BadSignature | Expired
            | NotYetValid | WrongIssuer | WrongAudience | Revoked => StatusCode::UNAUTHORIZED,
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            KeySourceUnavailable | TokenSourceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error` field (RFC 6750 codes for 400/401/403).
    pub fn error_code(self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "invalid_request",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::UNAUTHORIZED => "invalid_token",
            StatusCode::FORBIDDEN => "insufficient_scope",
            StatusCode::GATEWAY_TIMEOUT => "gateway_timeout",
            StatusCode::SERVICE_UNAVAILABLE => "temporarily_unavailable",
            _ => "bad_gateway",
        }
    }

    pub fn message(self) -> &'static str {
        use Reason::*;
        match self {
            BadPath => "The request path is ambiguous or malformed.",
            UnmappedRoute => "No route matches this path.",
            MethodNotAllowed => "This endpoint does not accept this method.",
            UnknownTenant => "The tenant in the path is not known.",
            UnknownAccount => "The account in the path is not known.",
            MissingToken => "A bearer token is required.",
            BadAuthorization => "The Authorization header must be a single 'Bearer <token>'.",
            MalformedToken => "The bearer token is malformed.",
            UnknownToken => "The bearer token is not known.",
            UnknownKey => "The token is signed with a key that is not configured.",
            BadSignature => "The token signature does not verify.",
            Expired => "The token has expired.",
            NotYetValid => "The token is not valid yet.",
            WrongIssuer => "The token was issued by an issuer that is not accepted.",
            WrongAudience => "The token is not meant for this API.",
            Revoked => "The token has been revoked.",
            Method => "The token does not allow this method.",
            Path => "The token does not allow this endpoint.",
            Tenant => "The token does not allow this tenant.",
            Account => "The token does not allow this account.",
            Plan => "The subscription plan does not include this operation.",
            UpstreamUnavailable => "The upstream service is unavailable.",
            UpstreamTimeout => "The upstream service did not answer in time.",
            KeySourceUnavailable => {
                "The keys to verify this token cannot be loaded right now; retry later."
            }
            TokenSourceUnavailable => "This token cannot be checked right now; retry later.",
        }
    }
}

impl From<AuthError> for Reason {
    fn from(e: AuthError) -> Reason {
        match e {
            AuthError::MissingToken => Reason::MissingToken,
            AuthError::BadAuthorization => Reason::BadAuthorization,
            AuthError::Malformed => Reason::MalformedToken,
            AuthError::UnknownToken => Reason::UnknownToken,
            AuthError::UnknownKey => Reason::UnknownKey,
            AuthError::BadSignature => Reason::BadSignature,
            AuthError::Expired => Reason::Expired,
            AuthError::NotYetValid => Reason::NotYetValid,
            AuthError::WrongIssuer => Reason::WrongIssuer,
            AuthError::WrongAudience => Reason::WrongAudience,
            AuthError::Revoked => Reason::Revoked,
            AuthError::KeySourceUnavailable => Reason::KeySourceUnavailable,
            AuthError::TokenSourceUnavailable => Reason::TokenSourceUnavailable,
        }
    }
}

impl From<Refusal> for Reason {
    fn from(r: Refusal) -> Reason {
        match r {
            Refusal::Cube(Axis::Method) => Reason::Method,
            Refusal::Cube(Axis::Path) => Reason::Path,
            Refusal::Cube(Axis::Tenant) => Reason::Tenant,
            Refusal::Cube(Axis::Account) => Reason::Account,
            Refusal::Plan => Reason::Plan,
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    reason: &'static str,
    message: &'static str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    required: Option<&'a Required<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blocked_by: Option<&'static str>,
}

/// What a refused request would have needed: the request's own method,
/// route, tag, tenant and account, nothing from the token and nothing about
/// any other tenant. Sent with the cube and plan denials, so a user can fix
/// the token (or see that the plan, not the token, is the blocker) without
/// reading logs.
#[derive(Debug, Serialize)]
pub struct Required<'a> {
    pub method: &'a str,
    pub route: &'a str,
    pub tag: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<&'a str>,
}

impl Reason {
    /// For the denials that teach: what blocked the request.
    pub fn blocked_by(self) -> Option<&'static str> {
        match self {
            Reason::Method | Reason::Path | Reason::Tenant | Reason::Account => Some("token"),
            Reason::Plan => Some("plan"),
            _ => None,
        }
    }
}

/// The JSON body of a denial.
pub fn body(reason: Reason, request_id: &str) -> Bytes {
    body_with(reason, request_id, None)
}

/// The JSON body, with `required` and `blocked_by` for the denials that
/// teach (others ignore `required`).
pub fn body_with(reason: Reason, request_id: &str, required: Option<&Required<'_>>) -> Bytes {
    let blocked_by = reason.blocked_by();
    let b = Body {
        error: reason.error_code(),
        reason: reason.as_str(),
        message: reason.message(),
        request_id,
        required: required.filter(|_| blocked_by.is_some()),
        blocked_by,
    };
    // Serializing a struct of strings cannot fail; an empty body is the
    // harmless fallback if it ever did.
    serde_json::to_vec(&b).map(Bytes::from).unwrap_or_default()
}

/// `Retry-After` on a 503 from a token source: long enough for a
/// background retry (the JWKS retries failures within `min_refetch`, 10 s by
/// default), short enough that clients do not give up.
pub const RETRY_AFTER_SECS: &str = "5";

/// A complete denial response. `allow` is set for 405.
pub fn response<B: From<Bytes>>(
    reason: Reason,
    request_id: &HeaderValue,
    allow: Option<&HeaderValue>,
) -> Response<B> {
    response_with(reason, request_id, allow, None)
}

/// [`response`], with what the request would have needed.
pub fn response_with<B: From<Bytes>>(
    reason: Reason,
    request_id: &HeaderValue,
    allow: Option<&HeaderValue>,
    required: Option<&Required<'_>>,
) -> Response<B> {
    let status = reason.status();
    let mut resp = Response::new(B::from(body_with(
        reason,
        request_id.to_str().unwrap_or(""),
        required,
    )));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(crate::proxy::X_REQUEST_ID, request_id.clone());
    match status {
        StatusCode::UNAUTHORIZED => {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="airbrx", error="invalid_token""#),
            );
        }
        StatusCode::FORBIDDEN => {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="airbrx", error="insufficient_scope""#),
            );
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            if let Some(a) = allow {
                h.insert(header::ALLOW, a.clone());
            }
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        _ => {}
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_follow_the_spec_table() {
        let expect = [
            (Reason::BadPath, 400, "invalid_request"),
            (Reason::UnmappedRoute, 404, "not_found"),
            (Reason::MethodNotAllowed, 405, "method_not_allowed"),
            (Reason::UnknownTenant, 403, "insufficient_scope"),
            (Reason::MissingToken, 401, "invalid_token"),
            (Reason::BadAuthorization, 400, "invalid_request"),
            (Reason::Revoked, 401, "invalid_token"),
            (Reason::Plan, 403, "insufficient_scope"),
            (Reason::UpstreamUnavailable, 502, "bad_gateway"),
            (Reason::UpstreamTimeout, 504, "gateway_timeout"),
            // Not in the SPEC's table: the README's 503s for a token source
            // that cannot answer (never a 401, which would say the token is bad).
            (Reason::KeySourceUnavailable, 503, "temporarily_unavailable"),
            (
                Reason::TokenSourceUnavailable,
                503,
                "temporarily_unavailable",
            ),
        ];
        for (r, status, code) in expect {
            assert_eq!(r.status().as_u16(), status, "{r:?}");
            assert_eq!(r.error_code(), code, "{r:?}");
        }
        for r in Reason::ALL {
            // serde's name and as_str agree for every reason.
            assert_eq!(
                serde_json::to_value(r).ok(),
                Some(serde_json::Value::from(r.as_str()))
            );
        }
    }

    #[test]
    fn body_is_json_with_the_four_fields() {
        let v: serde_json::Value =
            serde_json::from_slice(&body(Reason::Tenant, "rid-1")).expect("json");
        assert_eq!(v["error"], "insufficient_scope");
        assert_eq!(v["reason"], "tenant");
        assert_eq!(v["request_id"], "rid-1");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    #[test]
    fn only_the_503s_say_when_to_retry() {
        let rid = HeaderValue::from_static("rid-1");
        for r in Reason::ALL {
            let resp: Response<Bytes> = response(r, &rid, None);
            let want = (r.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER_SECS);
            assert_eq!(
                resp.headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()),
                want,
                "{r:?}"
            );
        }
    }

    #[test]
    fn every_reason_has_a_sentence_of_its_own() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            let m = r.message();
            assert!(
                m.starts_with(|c: char| c.is_ascii_uppercase()) && m.ends_with('.'),
                "{r:?}: {m}"
            );
            assert!(seen.insert(m), "{r:?} shares its message: {m}");
        }
    }
}
