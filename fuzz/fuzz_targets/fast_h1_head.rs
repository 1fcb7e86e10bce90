//! The listener's own HTTP/1 loop's head parser (src/server/fast.rs): it
//! takes one whole head and leaves exactly the bytes after it, or leaves
//! every byte for hyper, and a head it takes reads as httparse reads it.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    properties::fast_h1_head(data);
});
