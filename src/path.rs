//! The one path canonicalizer (SPEC §6 step 1).
//!
//! Owns the decision of which request paths are unambiguous enough to match
//! and forward. The path it returns is exactly the one the route table sees
//! and the one the upstream receives, so no component downstream can read a
//! different path from the same bytes.
//!
//! What it does: decodes percent-encoded *unreserved* characters
//! (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §6.2.2.2) and upper-cases the hex of the
//! other escapes, so `/v1/tenants/acme%2Dprod` and `/v1/tenants/acme-prod`
//! are the same request. What it rejects: dot segments (raw, encoded, mixed
//! case, or followed by `;` matrix parameters, which Java servers strip),
//! encoded `/` and `\`, a literal `\`, empty segments (`//`), NUL and other
//! control bytes (raw or encoded), raw non-ASCII bytes, bad percent-encoding,
//! escapes that do not decode to UTF-8 (overlong forms such as `%C0%AE`), and
//! anything that does not start with `/` (`*`, absolute form is split off by
//! the HTTP parser before this point).
//!
//! It must not allocate when the path is already canonical, and it must never
//! panic on any input.

use std::borrow::Cow;

/// Why a path was refused. The variants exist for tests and logs; every one
/// of them maps to `400 bad_path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("path does not start with '/'")]
    NotAbsolute,
    #[error("path contains a control, NUL or non-ASCII byte")]
    ControlByte,
    #[error("path contains a backslash")]
    Backslash,
    #[error("path contains an encoded '/' or '\\'")]
    EncodedSeparator,
    #[error("path contains a malformed percent-escape")]
    BadEscape,
    #[error("path escapes do not decode to UTF-8")]
    BadUtf8,
    #[error("path contains an empty segment ('//')")]
    EmptySegment,
    #[error("path contains a '.' or '..' segment")]
    DotSegment,
}

/// Longest path accepted; longer ones are refused as `bad_path` before any
/// work is done on them (hyper bounds the whole head too; this keeps the
/// canonicalizer's own work bounded).
pub const MAX_PATH_LEN: usize = 8 * 1024;

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Canonicalize a request path (without its query). Returns the borrowed
/// input when it is already canonical.
pub fn canonicalize(raw: &str) -> Result<Cow<'_, str>, BadPath> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(BadPath::NotAbsolute);
    }
    if bytes.len() > MAX_PATH_LEN {
        return Err(BadPath::ControlByte);
    }
    // The common case: nothing to decode or refuse byte by byte, so the
    // input is its own canonical form if its segments are. One tight pass
    // instead of the escape-aware loop below (about 0.5k instructions of a
    // proxied request, counted with callgrind).
    if bytes
        .iter()
        .all(|&b| (0x21..0x7f).contains(&b) && b != b'%' && b != b'\\')
    {
        check_segments(bytes)?;
        return Ok(Cow::Borrowed(raw));
    }
    canonicalize_bytewise(raw)
}

/// The whole canonicalizer, byte by byte: what [`canonicalize`] falls back
/// to, and what its fast path is tested against.
fn canonicalize_bytewise(raw: &str) -> Result<Cow<'_, str>, BadPath> {
    let bytes = raw.as_bytes();
    // `out` stays None until the first byte that changes; then it holds the
    // canonical form built so far.
    let mut out: Option<Vec<u8>> = None;
    // Decoded bytes >= 0x80 from escapes, checked as UTF-8 sequences.
    let mut pending_utf8: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (h, l) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&h), Some(&l)) => (h, l),
                    _ => return Err(BadPath::BadEscape),
                };
                let v = match (hex_val(h), hex_val(l)) {
                    (Some(h), Some(l)) => (h << 4) | l,
                    _ => return Err(BadPath::BadEscape),
                };
                if v == b'/' || v == b'\\' {
                    return Err(BadPath::EncodedSeparator);
                }
                if v < 0x20 || v == 0x7f {
                    return Err(BadPath::ControlByte);
                }
                if v >= 0x80 {
                    pending_utf8.push(v);
                } else {
                    flush_utf8(&mut pending_utf8)?;
                }
                if is_unreserved(v) {
                    out.get_or_insert_with(|| bytes[..i].to_vec()).push(v);
                } else {
                    let canonical = [
                        b'%',
                        HEX_UPPER[(v >> 4) as usize],
                        HEX_UPPER[(v & 15) as usize],
                    ];
                    if canonical[1] != h || canonical[2] != l {
                        out.get_or_insert_with(|| bytes[..i].to_vec());
                    }
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(&canonical);
                    }
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(BadPath::Backslash),
            0..=0x1f | 0x7f..=0xff => return Err(BadPath::ControlByte),
            _ => {
                flush_utf8(&mut pending_utf8)?;
                if let Some(o) = out.as_mut() {
                    o.push(b);
                }
            }
        }
        i += 1;
    }
    flush_utf8(&mut pending_utf8)?;

    let canonical: Cow<'_, [u8]> = match out {
        Some(v) => Cow::Owned(v),
        None => Cow::Borrowed(bytes),
    };
    check_segments(&canonical)?;
    match canonical {
        Cow::Borrowed(_) => Ok(Cow::Borrowed(raw)),
        // Only ASCII bytes were ever pushed, so this cannot fail; map the
        // impossible case to a refusal rather than a panic all the same.
        Cow::Owned(v) => String::from_utf8(v)
            .map(Cow::Owned)
            .map_err(|_| BadPath::BadUtf8),
    }
}

fn flush_utf8(pending: &mut Vec<u8>) -> Result<(), BadPath> {
    if !pending.is_empty() {
        if std::str::from_utf8(pending).is_err() {
            return Err(BadPath::BadUtf8);
        }
        pending.clear();
    }
    Ok(())
}

/// Segment rules on the canonical bytes: no empty segment except a single
/// trailing one (`/a/` is a distinct, unambiguous path; `/a//b` is not), no
/// `.`/`..` segment, also not before `;` matrix parameters.
fn check_segments(path: &[u8]) -> Result<(), BadPath> {
    // path starts with '/', so the first split item is the empty prefix.
    let mut segments = path.split(|&b| b == b'/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg.is_empty() {
            if last {
                break;
            }
            return Err(BadPath::EmptySegment);
        }
        let name = seg.split(|&b| b == b';').next().unwrap_or(seg);
        if name == b"." || name == b".." {
            return Err(BadPath::DotSegment);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        match canonicalize(p) {
            Ok(c) => c.into_owned(),
            Err(e) => panic!("{p:?} refused: {e}"),
        }
    }

    #[test]
    fn canonical_paths_pass_unchanged_and_borrowed() {
        for p in [
            "/",
            "/v1/health",
            "/v1/tenants/acme-prod/rules/r_1",
            "/v1/a/",
            "/a%20b",
            "/a;v=1",
            "/.well-known/x",
            "/a/..b/c.",
        ] {
            assert!(matches!(canonicalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_uppercased() {
        assert_eq!(ok("/v1/tenants/acme%2Dprod"), "/v1/tenants/acme-prod");
        assert_eq!(ok("/v1/%61%62c"), "/v1/abc");
        assert_eq!(ok("/a%2fb".replace("%2f", "%3a").as_str()), "/a%3Ab");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
    }

    #[test]
    fn ambiguous_shapes_are_refused() {
        let cases: &[(&str, BadPath)] = &[
            ("", BadPath::NotAbsolute),
            ("*", BadPath::NotAbsolute),
            ("v1/x", BadPath::NotAbsolute),
            ("/a/../b", BadPath::DotSegment),
            ("/a/./b", BadPath::DotSegment),
            ("/a/..", BadPath::DotSegment),
            ("/..", BadPath::DotSegment),
            ("/a/%2e%2e/b", BadPath::DotSegment),
            ("/a/%2E%2e/b", BadPath::DotSegment),
            ("/a/.%2E/b", BadPath::DotSegment),
            ("/a/%2e/b", BadPath::DotSegment),
            ("/a/..;jsessionid=1/b", BadPath::DotSegment),
            ("/a/%2e%2e;x/b", BadPath::DotSegment),
            ("/a%2fb", BadPath::EncodedSeparator),
            ("/a%2Fb", BadPath::EncodedSeparator),
            ("/a%5cb", BadPath::EncodedSeparator),
            ("/a%5Cb", BadPath::EncodedSeparator),
            ("/a\\b", BadPath::Backslash),
            ("//a", BadPath::EmptySegment),
            ("/a//b", BadPath::EmptySegment),
            ("/a/b//", BadPath::EmptySegment),
            ("/a\0b", BadPath::ControlByte),
            ("/a%00b", BadPath::ControlByte),
            ("/a%0ab", BadPath::ControlByte),
            ("/a%7Fb", BadPath::ControlByte),
            ("/a\tb", BadPath::ControlByte),
            ("/a\u{e9}", BadPath::ControlByte),
            ("/a%", BadPath::BadEscape),
            ("/a%4", BadPath::BadEscape),
            ("/a%zz", BadPath::BadEscape),
            ("/a%%41", BadPath::BadEscape),
            ("/%c0%ae%c0%ae/x", BadPath::BadUtf8),
            ("/%c0%af", BadPath::BadUtf8),
            ("/%e9", BadPath::BadUtf8),
            ("/%c3", BadPath::BadUtf8),
            ("/%c3/%a9", BadPath::BadUtf8),
        ];
        for (p, want) in cases {
            assert_eq!(canonicalize(p).err(), Some(*want), "{p:?}");
        }
    }

    #[test]
    fn canonical_output_is_a_fixed_point() {
        for p in ["/v1/tenants/acme%2dprod/x%3a", "/caf%c3%a9/%7e", "/a;b=%41"] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p}");
            assert!(matches!(canonicalize(&once), Ok(Cow::Borrowed(_))));
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_bytewise_canonicalizer() {
        // Paths built from the bytes that decide things: separators, dots,
        // matrix parameters, escapes, backslash, space, control, non-ASCII.
        let alphabet: &[&str] = &[
            "/", "/", "a", "Z", "9", ".", "..", ";", "-", "~", ":", "@", "%", "%2e", "%2F", "%41",
            "%c3%a9", "\\", " ", "\t", "\u{e9}", "?", "#", "!", "=",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let mut p = String::from("/");
            for _ in 0..rng.usize(0..12) {
                p.push_str(alphabet[rng.usize(0..alphabet.len())]);
            }
            let fast = canonicalize(&p);
            assert_eq!(fast, canonicalize_bytewise(&p), "{p:?}");
            if let Ok(c) = &fast {
                // Borrowed exactly when nothing changed.
                assert_eq!(matches!(c, Cow::Borrowed(_)), c == &p, "{p:?}");
            }
        }
    }

    #[test]
    fn overlong_path_is_refused() {
        let p = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert!(canonicalize(&p).is_err());
        // 8 KiB is still a path.
        let p = format!("/{}", "a".repeat(8 * 1024 - 1));
        assert_eq!(canonicalize(&p).as_deref(), Ok(p.as_str()));
    }
}
