//! Bearer tokens (SPEC §4, §5, §6 step 3).
//!
//! Owns reading the `Authorization` header, telling a PAT from a JWT, and
//! turning either into a verified [`Principal`] with compiled cubes. It
//! decides *who* is calling, never *what* they may do (that is
//! [`crate::scope`]). It must not log, store or echo a token: only its
//! SHA-256 (PATs) or its claims after verification leave this module.

pub mod jwt;
pub mod pat;

use std::borrow::Cow;

use http::HeaderMap;

use crate::scope::Cube;

pub use jwt::{JwtKey, JwtKeys};
pub use pat::{PatRecord, PatStore};

/// Longest bearer token looked at; longer ones are `malformed_token` before
/// any decoding (no large allocation for a hostile header).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Why authentication failed. Each maps to one `reason` in SPEC §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    MissingToken,
    BadAuthorization,
    Malformed,
    UnknownToken,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    Revoked,
}

/// Which kind of token authenticated the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Pat,
    Jwt,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Pat => "pat",
            TokenKind::Jwt => "jwt",
        }
    }
}

/// A verified caller: identity and grants. Borrowed from the snapshot for
/// PATs, owned for JWTs.
#[derive(Debug, Clone)]
pub struct Principal<'s> {
    pub kind: TokenKind,
    /// PAT record `id`, JWT `jti` (or `sub`).
    pub token_id: Cow<'s, str>,
    /// PAT record `id`, JWT `sub` (absent when the JWT has none).
    pub subject: Option<Cow<'s, str>>,
    pub cubes: Cow<'s, [Cube]>,
}

/// The bearer token of a request, or why there is none. Only the
/// `Authorization` header is read; a token in the query string is ignored.
pub fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingToken)?;
    if values.next().is_some() {
        return Err(AuthError::BadAuthorization);
    }
    let value = value.to_str().map_err(|_| AuthError::BadAuthorization)?;
    // RFC 7235: the scheme is case-insensitive; one or more spaces follow it.
    let (scheme, rest) = value.split_once(' ').ok_or(AuthError::BadAuthorization)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::BadAuthorization);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() || token.len() > MAX_TOKEN_LEN || token.contains([' ', '\t']) {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Header values must be safe to copy into `x-airbrx-*` headers and logs:
/// visible ASCII, bounded. Identities that are not are refused, not mangled.
pub(crate) fn is_safe_identity(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(values: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    #[test]
    fn bearer_header_shapes() {
        assert_eq!(bearer(&h(&[])), Err(AuthError::MissingToken));
        assert_eq!(
            bearer(&h(&["Bearer a", "Bearer b"])),
            Err(AuthError::BadAuthorization)
        );
        assert_eq!(
            bearer(&h(&["Basic dXNlcjpw"])),
            Err(AuthError::BadAuthorization)
        );
        assert_eq!(bearer(&h(&["Bearer"])), Err(AuthError::BadAuthorization));
        assert_eq!(bearer(&h(&["Bearer "])), Err(AuthError::Malformed));
        assert_eq!(bearer(&h(&["Bearer a b"])), Err(AuthError::Malformed));
        assert_eq!(bearer(&h(&["bearer tok"])), Ok("tok"));
        assert_eq!(bearer(&h(&["Bearer  tok"])), Ok("tok"));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert_eq!(bearer(&h(&[&long])), Err(AuthError::Malformed));
    }

    #[test]
    fn identities_must_be_header_safe() {
        assert!(is_safe_identity("tok_analytics-export.1"));
        assert!(!is_safe_identity(""));
        assert!(!is_safe_identity("a b"));
        assert!(!is_safe_identity("a\nb"));
        assert!(!is_safe_identity("é"));
        assert!(!is_safe_identity(&"a".repeat(257)));
    }
}
