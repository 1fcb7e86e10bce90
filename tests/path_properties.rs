//! Properties of the path canonicalizer (SPEC §6 step 1), on stable with
//! proptest: for any input it never panics; what it accepts is canonical
//! (idempotent) and contains no shape it must reject; and the path it
//! forwards matches the same route, with the same tenant, as the path it
//! checked.

use proptest::prelude::*;
use scopegate::path::canonicalize;

/// Path-ish strings: segments drawn from an alphabet rich in the
/// characters that make paths ambiguous.
fn pathish() -> impl Strategy<Value = String> {
    // Structural pieces are weighted up so that dot segments, `;`
    // parameters and empty segments meet often enough to matter.
    let piece = prop_oneof![
        6 => Just("/".to_string()),
        4 => Just("..".to_string()),
        3 => Just(".".to_string()),
        3 => Just(";".to_string()),
        6 => "[a-zA-Z0-9_~-]{1,6}",
        2 => Just("%2e".to_string()),
        1 => Just("%2E".to_string()),
        1 => Just("%2f".to_string()),
        1 => Just("%5C".to_string()),
        1 => Just("\\".to_string()),
        1 => Just("%00".to_string()),
        1 => Just("%".to_string()),
        1 => Just("%c0%ae".to_string()),
        1 => Just("%c3%a9".to_string()),
        1 => Just("%41".to_string()),
        1 => Just("%2D".to_string()),
        1 => Just("acme-prod".to_string()),
        1 => "%[0-9a-fA-F]{2}",
        1 => any::<char>().prop_map(|c| c.to_string()),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

/// The shapes SPEC §6 rejects, looked for in a canonical path.
fn has_rejected_shape(p: &str) -> Option<&'static str> {
    if !p.starts_with('/') {
        return Some("not absolute");
    }
    if p.contains('\\') {
        return Some("backslash");
    }
    if p.bytes().any(|b| b < 0x20 || b == 0x7f || b >= 0x80) {
        return Some("control or non-ASCII byte");
    }
    let lower = p.to_ascii_lowercase();
    for bad in ["%2f", "%5c", "%00", "%2e"] {
        if lower.contains(bad) {
            return Some("encoded separator, NUL or dot");
        }
    }
    let segments: Vec<&str> = p[1..].split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() && i + 1 != segments.len() {
            return Some("empty segment");
        }
        let name = seg.split(';').next().unwrap_or(seg);
        if name == "." || name == ".." {
            return Some("dot segment");
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_any_string(s in any::<String>()) {
        let _ = canonicalize(&s);
    }

    #[test]
    fn accepted_paths_are_canonical_and_unambiguous(s in pathish()) {
        if let Ok(c) = canonicalize(&s) {
            let c = c.into_owned();
            prop_assert_eq!(has_rejected_shape(&c), None, "input {:?} gave {:?}", s, c);
            // Idempotent: the forwarded path canonicalizes to itself.
            let again = canonicalize(&c);
            prop_assert!(again.is_ok(), "canonical {:?} refused on a second pass", c);
            prop_assert_eq!(again.map(|a| a.into_owned()).ok(), Some(c));
        }
    }

    #[test]
    fn the_forwarded_path_matches_the_same_route_and_tenant(tenant in "[a-z0-9-]{1,8}", tail in pathish()) {
        let mut table = scopegate::routes::RouteTable::default();
        let routes = [
            "/v1/tenants/{tenant}/rules",
            "/v1/tenants/{tenant}/rules/{rule_id}",
            "/v1/tenants/{tenant}/analytics/{*rest}",
        ];
        for r in routes {
            table.insert(r, Some(0), scopegate::scope::MethodSet::ALL).expect("route");
        }
        let raw = format!("/v1/tenants/{tenant}/{tail}");
        if let Ok(checked) = canonicalize(&raw) {
            // The upstream receives `checked`; were it canonicalized again on
            // the way (as a second proxy would), it must land on the same
            // route and tenant.
            let forwarded = canonicalize(&checked).map(|c| c.into_owned());
            prop_assert!(forwarded.is_ok());
            let forwarded = forwarded.unwrap_or_default();
            let a = table.at(&checked).map(|m| (m.id, m.tenant.map(str::to_owned)));
            let b = table.at(&forwarded).map(|m| (m.id, m.tenant.map(str::to_owned)));
            prop_assert_eq!(a, b);
        }
    }
}
