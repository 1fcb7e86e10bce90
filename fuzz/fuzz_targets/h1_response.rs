//! The in-future upstream client's response parser and chunked decoder
//! (src/h1.rs): never panic, report the framing the headers say, decode
//! alike whatever the read boundaries. The first byte picks HEAD (bit 0)
//! and the read step (the rest); the remaining bytes are the upstream's.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    properties::h1_head(rest, flags & 1 == 1);
    properties::h1_chunked(rest, usize::from(flags >> 1).max(1));
});
