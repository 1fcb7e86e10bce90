//! gateway.yaml: loading never panics, errors name the file, no secret in
//! what a loaded snapshot prints.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        properties::config(s);
    }
});
