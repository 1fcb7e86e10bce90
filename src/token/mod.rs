//! Bearer tokens (SPEC §4, §5, §6 step 3).
//!
//! Owns reading the `Authorization` header, telling a PAT from a JWT, and
//! turning either into a verified [`Principal`] with compiled cubes. It
//! decides *who* is calling, never *what* they may do (that is
//! [`crate::scope`]). It must not log, store or echo a token: only its
//! SHA-256 (PATs) or its claims after verification leave this module.

pub mod introspect;
pub mod jwks;
pub mod jwt;
pub mod pat;

use http::{HeaderMap, HeaderValue};

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
    /// The token needs the JWKS, and no key set has loaded yet.
    KeySourceUnavailable,
    /// The PAT needs introspection, the endpoint failed, nothing is cached.
    TokenSourceUnavailable,
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

/// A verified caller: identity and grants. Borrows the PAT record from the
/// snapshot, or shares the verified JWT with the cache: neither allocates.
#[derive(Debug, Clone)]
pub enum Principal<'s> {
    Pat(&'s PatRecord),
    Jwt(std::sync::Arc<jwt::VerifiedJwt>),
    /// A PAT vouched for by the introspection endpoint.
    Introspected(std::sync::Arc<introspect::Introspected>),
}

impl Principal<'_> {
    pub fn kind(&self) -> TokenKind {
        match self {
            Principal::Pat(_) | Principal::Introspected(_) => TokenKind::Pat,
            Principal::Jwt(_) => TokenKind::Jwt,
        }
    }

    /// PAT record `id`, JWT `jti` (or `sub`).
    pub fn token_id(&self) -> &str {
        match self {
            Principal::Pat(r) => &r.id,
            Principal::Jwt(j) => &j.token_id,
            Principal::Introspected(i) => &i.token_id,
        }
    }

    /// PAT record `id`, JWT `sub` (absent when the JWT has none).
    pub fn subject(&self) -> Option<&str> {
        match self {
            Principal::Pat(r) => Some(&r.id),
            Principal::Jwt(j) => j.subject.as_deref(),
            Principal::Introspected(i) => i.subject.as_deref(),
        }
    }

    /// The `X-Airbrx-Token-Id` and `X-Airbrx-Subject` values: made once
    /// per verified JWT, per request otherwise. `None` for a value that is
    /// not a header value (never, for identities checked by
    /// `is_safe_identity`).
    pub fn identity_headers(&self) -> (Option<HeaderValue>, Option<HeaderValue>) {
        match self {
            Principal::Jwt(j) => (j.token_id_header.clone(), j.subject_header.clone()),
            _ => (
                HeaderValue::from_str(self.token_id()).ok(),
                self.subject().and_then(|s| HeaderValue::from_str(s).ok()),
            ),
        }
    }

    pub fn cubes(&self) -> &[Cube] {
        match self {
            Principal::Pat(r) => &r.cubes,
            Principal::Jwt(j) => &j.cubes,
            Principal::Introspected(i) => &i.cubes,
        }
    }
}

/// RFC 6750 §2.1 `b64token`: ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" /
/// "/", then trailing "=". Anything else in a token is malformed. The
/// reference the request path's [`b64token_body_char`] is tested against.
#[cfg(test)]
const fn b64token_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=');
        i += 1;
    }
    t
}
#[cfg(test)]
static B64TOKEN: [bool; 256] = b64token_table();

/// A `b64token` character before the padding (RFC 6750 §2.1 without `=`),
/// as comparisons instead of a table lookup so that a loop over a token
/// vectorizes. The tests compare it with `b64token_table` on all 256 bytes.
#[inline]
fn b64token_body_char(b: u8) -> bool {
    // Setting bit 5 folds A-Z onto a-z and moves no other byte into a-z.
    let lower = b | 0x20;
    lower.wrapping_sub(b'a') < 26
        || b.wrapping_sub(b'0') < 10
        || b == b'-'
        || b == b'.'
        || b == b'_'
        || b == b'~'
        || b == b'+'
        || b == b'/'
}

/// The bearer token of a request, or why there is none. Only the
/// `Authorization` header is read; a token in the query string is ignored.
/// One pass over the bytes: this runs on every request.
pub fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingToken)?.as_bytes();
    if values.next().is_some() {
        return Err(AuthError::BadAuthorization);
    }
    // RFC 7235: the scheme is case-insensitive and followed by one or more spaces.
    let (scheme, rest) = match value.iter().position(|&b| b == b' ') {
        Some(i) => (&value[..i], &value[i..]),
        None => return Err(AuthError::BadAuthorization),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthError::BadAuthorization);
    }
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    let end = rest
        .iter()
        .rposition(|&b| b != b' ')
        .map_or(start, |i| i + 1);
    let token = &rest[start..end];
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed);
    }
    // `=` only as trailing padding.
    let body = token.len() - token.iter().rev().take_while(|&&b| b == b'=').count();
    // Without an early exit, so the compiler checks 16 bytes at a time: a
    // JWT is some 300 of them and this runs on every request.
    if !token[..body]
        .iter()
        .fold(true, |ok, &b| ok & b64token_body_char(b))
    {
        return Err(AuthError::Malformed);
    }
    // Every byte is ASCII now, so this cannot fail.
    std::str::from_utf8(token).map_err(|_| AuthError::Malformed)
}

/// Header values must be safe to copy into `x-airbrx-*` headers and logs:
/// visible ASCII, bounded. Identities that are not are refused, not mangled.
pub fn is_safe_identity(s: &str) -> bool {
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
    fn the_fast_character_check_is_the_table_without_padding() {
        for b in 0..=255u8 {
            assert_eq!(
                b64token_body_char(b),
                B64TOKEN[b as usize] && b != b'=',
                "byte {b:#04x}"
            );
        }
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
        assert_eq!(
            bearer(&h(&["BEARER a.b-c_d~e+f/g=="])),
            Ok("a.b-c_d~e+f/g==")
        );
        assert_eq!(bearer(&h(&["Bearer a\tb"])), Err(AuthError::Malformed));
        assert_eq!(bearer(&h(&["Bearer a=b"])), Err(AuthError::Malformed));
        assert_eq!(bearer(&h(&["Bearer a,b"])), Err(AuthError::Malformed));
        assert_eq!(bearer(&h(&["Bearer \"tok\""])), Err(AuthError::Malformed));
        assert_eq!(bearer(&h(&["Bearertok"])), Err(AuthError::BadAuthorization));
        // The bound is inclusive: 8 KiB is a token, one byte more is not.
        let longest = "a".repeat(MAX_TOKEN_LEN);
        assert_eq!(
            bearer(&h(&[&format!("Bearer {longest}")])),
            Ok(longest.as_str())
        );
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
