//! The whole decision (path, route, token, cube, plan) on arbitrary
//! requests. Input: a selector byte (0 no token, 1 the valid PAT, 2 the
//! valid JWT, else the raw `Authorization` value after the path), then
//! `METHOD path\n[authorization]`.
#![no_main]

#[path = "../../tests/properties/mod.rs"]
mod properties;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Some(sp) = rest.iter().position(|&b| b == b' ') else {
        return;
    };
    let (method, rest) = (&rest[..sp], &rest[sp + 1..]);
    let nl = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let Ok(path) = std::str::from_utf8(&rest[..nl]) else {
        return;
    };
    let raw = rest.get(nl + 1..).unwrap_or_default();
    let auth = match which % 4 {
        0 => properties::Auth::None,
        1 => properties::Auth::Pat,
        2 => properties::Auth::Jwt,
        _ => properties::Auth::Raw(raw),
    };
    properties::decision(method, path, auth);
});
