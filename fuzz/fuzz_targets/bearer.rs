//! The `Authorization` header, PAT shape and lookup, and compact-JWS
//! verification (answer stable across the cache) on arbitrary bytes.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    properties::bearer_value(data);
    if let Ok(s) = std::str::from_utf8(data) {
        properties::jwt_token(s);
    }
});
