//! The PAT file: the parallel chunked parser agrees with serde_yaml on the
//! whole document.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        properties::pat_file(s);
    }
});
