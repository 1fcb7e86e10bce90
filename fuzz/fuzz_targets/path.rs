//! The path canonicalizer: never panics, idempotent, no rejected shape in
//! its output, same route and tenant before and after forwarding.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        properties::path(s);
    }
});
