//! JOSE header and claims of a *validly signed* HS256 token: everything the
//! verifier reads after the signature check. Input: one length byte, then
//! the header, then the claims. A length byte of 0 uses the good header so
//! the fuzzer spends its time on the claims.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (header, claims) = if n == 0 {
        (&br#"{"alg":"HS256","kid":"hs"}"#[..], rest)
    } else {
        rest.split_at(usize::from(n).min(rest.len()))
    };
    properties::signed_claims(header, claims);
});
