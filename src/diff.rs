//! `scopegate diff`: replay decisions recorded in the JSON access log
//! against a candidate configuration and report what would flip.
//!
//! The log holds no token (by design), so a request is rebuilt from its
//! route template (unknown path parameters filled with a placeholder), its
//! tenant and account, and its token id:
//! - a PAT is looked up by id in the candidate's PAT file, so cube, expiry
//!   and revocation changes are replayed in full;
//! - a JWT's cube is not in the log: requests it was allowed (or refused
//!   only by the plan) are replayed with the token assumed to still cover
//!   them, so route, tenant, account and plan changes show; requests its
//!   cube refused cannot be replayed and are counted as such;
//! - requests refused before authorization by something the configuration
//!   does not decide (a malformed token, an ambiguous path) are skipped.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::config::Snapshot;
use crate::decision::decide_with;
use crate::scope::{Cube, IdSet, MethodSet};
use crate::token::introspect::Introspected;
use crate::token::{AuthError, Principal};

/// One access-log line, as far as the replay needs it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Recorded {
    pub method: String,
    #[serde(default)]
    pub route: String,
    #[serde(default)]
    pub tag: String,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub account: String,
    #[serde(default)]
    pub token_id: String,
    #[serde(default)]
    pub token_kind: String,
    pub decision: String,
    #[serde(default)]
    pub reason: String,
}

/// A group of flipped requests.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Flip {
    /// `allow→deny` or `deny→allow`.
    pub direction: String,
    pub tag: String,
    /// The candidate's effective plan for the request (`-` when none).
    pub plan: String,
    /// The candidate's reason for a new denial, the recorded one for a new allow.
    pub reason: String,
    pub count: u64,
    /// One request of the group: `METHOD route tenant=… token=…`.
    pub example: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub replayed: u64,
    pub unchanged: u64,
    /// Lines whose recorded decision the *current* configuration no longer
    /// reproduces (the log predates it); flips are current vs candidate.
    pub stale: u64,
    /// Lines that could not be replayed, by why.
    pub skipped: BTreeMap<String, u64>,
    pub flips: Vec<Flip>,
}

/// Reasons decided before or outside the configuration's say.
fn not_replayable(reason: &str) -> Option<&'static str> {
    match reason {
        "bad_path" => Some("ambiguous path (not decided by configuration)"),
        "missing_token"
        | "bad_authorization"
        | "malformed_token"
        | "bad_signature"
        | "not_yet_valid"
        | "wrong_issuer"
        | "wrong_audience"
        | "key_source_unavailable"
        | "token_source_unavailable" => Some("authentication (token not in the log)"),
        "unknown_key" => Some("authentication (token not in the log)"),
        _ => None,
    }
}

/// The path of a recorded request: its template with `{tenant}` and
/// `{account}` filled in and every other parameter a placeholder.
fn rebuild_path(r: &Recorded) -> Option<String> {
    if r.route.is_empty() {
        return None;
    }
    let mut out = String::new();
    let mut rest = r.route.as_str();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}')? + open;
        let name = rest[open + 1..close].trim_start_matches('*');
        let value = match name {
            "tenant" => r.tenant.as_str(),
            "account" => r.account.as_str(),
            _ => "_",
        };
        if value.is_empty() {
            return None;
        }
        out.push_str(value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// A principal whose cube covers everything: a JWT assumed to still cover
/// what it was allowed.
fn assume_covered(token_id: &str) -> Principal<'static> {
    Principal::Introspected(Arc::new(Introspected {
        token_id: token_id.into(),
        subject: None,
        cubes: Box::new([Cube {
            methods: MethodSet::ALL,
            tags: IdSet::Any,
            routes: IdSet::Any,
            tenants: IdSet::Any,
            accounts: IdSet::Any,
        }]),
        exp: None,
    }))
}

/// How one configuration decides a recorded request: allowed, or the
/// reason; with the tag and plan it resolved.
struct Replayed {
    allowed: bool,
    reason: String,
    tag: Option<String>,
    plan: Option<String>,
}

fn decide_recorded(
    snap: &Snapshot,
    r: &Recorded,
    method: &http::Method,
    path: &str,
    now: i64,
) -> Replayed {
    let authenticated: Option<Result<Principal<'_>, AuthError>> = match r.token_kind.as_str() {
        _ if r.decision == "public" => None,
        "pat" => Some(match snap.pats.find_by_id(&r.token_id) {
            None => Err(AuthError::UnknownToken),
            Some(p) if p.expires.is_some_and(|e| now >= e) => Err(AuthError::Expired),
            Some(p) if p.disabled => Err(AuthError::Revoked),
            Some(p) => Ok(Principal::Pat(p)),
        }),
        // A JWT (or a request refused before authentication): the token is
        // assumed to cover the request; route, tenant, account and plan
        // are what is replayed.
        _ => Some(Ok(assume_covered(if r.token_id.is_empty() {
            "-"
        } else {
            &r.token_id
        }))),
    };
    let headers = http::HeaderMap::new();
    let out = decide_with(snap, method, path, &headers, now, authenticated);
    let names = out.matched.map(|m| m.names(snap));
    Replayed {
        allowed: out.verdict.is_ok(),
        reason: match out.verdict {
            Err(reason) => reason.as_str().to_string(),
            Ok(_) => String::new(),
        },
        tag: names.and_then(|n| n.tag).map(str::to_string),
        plan: names.and_then(|n| n.plan).map(str::to_string),
    }
}

/// Replay `lines` (JSON access-log lines; others are ignored) against the
/// current configuration and the candidate, and group the requests whose
/// decision differs. `now` is Unix seconds, for PAT expiry.
pub fn replay<'a>(
    current: &Snapshot,
    candidate: &Snapshot,
    lines: impl Iterator<Item = &'a str>,
    now: i64,
) -> Report {
    let mut report = Report::default();
    let mut groups: BTreeMap<(String, String, String, String), Flip> = BTreeMap::new();
    let skip = |report: &mut Report, why: &str| {
        *report.skipped.entry(why.to_string()).or_default() += 1;
    };
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["target"] != "scopegate::access" {
            continue;
        }
        let Ok(r) = serde_json::from_value::<Recorded>(v) else {
            skip(&mut report, "unreadable access-log line");
            continue;
        };
        let was_allowed = match r.decision.as_str() {
            "allow" | "public" => true,
            "deny" | "shadow_deny" => false,
            _ => {
                skip(&mut report, "unknown decision");
                continue;
            }
        };
        if let Some(why) = not_replayable(&r.reason) {
            skip(&mut report, why);
            continue;
        }
        let Some(path) = rebuild_path(&r) else {
            skip(
                &mut report,
                "route or its tenant/account not in the log (e.g. an unknown tenant)",
            );
            continue;
        };
        let Ok(method) = http::Method::from_bytes(r.method.as_bytes()) else {
            skip(&mut report, "unreadable method");
            continue;
        };
        let cube_refused = matches!(r.reason.as_str(), "method" | "path" | "tenant" | "account");
        if r.token_kind == "jwt" && cube_refused {
            skip(&mut report, "JWT refused by its cube (cube not in the log)");
            continue;
        }
        // Without a token kind only public routes and requests refused
        // before authentication (no token id) can be replayed.
        let pre_auth_denial = r.token_id.is_empty() && !was_allowed;
        if !matches!(r.token_kind.as_str(), "pat" | "jwt")
            && r.decision != "public"
            && !pre_auth_denial
        {
            skip(&mut report, "token kind not recorded");
            continue;
        }
        report.replayed += 1;
        let before = decide_recorded(current, &r, &method, &path, now);
        let after = decide_recorded(candidate, &r, &method, &path, now);
        if before.allowed != was_allowed {
            report.stale += 1;
        }
        if before.allowed == after.allowed {
            report.unchanged += 1;
            continue;
        }
        let tag = after.tag.or(before.tag).unwrap_or_else(|| {
            if r.tag.is_empty() {
                "-".into()
            } else {
                r.tag.clone()
            }
        });
        let plan = after.plan.or(before.plan).unwrap_or_else(|| "-".into());
        let (direction, reason) = if before.allowed {
            ("allow→deny", after.reason)
        } else {
            ("deny→allow", before.reason)
        };
        let example = format!(
            "{} {} tenant={} account={} token={}",
            r.method,
            r.route,
            if r.tenant.is_empty() { "-" } else { &r.tenant },
            if r.account.is_empty() {
                "-"
            } else {
                &r.account
            },
            if r.token_id.is_empty() {
                "-"
            } else {
                &r.token_id
            },
        );
        let key = (
            direction.to_string(),
            tag.clone(),
            plan.clone(),
            reason.clone(),
        );
        groups
            .entry(key)
            .or_insert_with(|| Flip {
                direction: direction.into(),
                tag,
                plan,
                reason,
                count: 0,
                example,
            })
            .count += 1;
    }
    report.flips = groups.into_values().collect();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(route: &str, tenant: &str, account: &str) -> Recorded {
        Recorded {
            method: "GET".into(),
            route: route.into(),
            tag: String::new(),
            tenant: tenant.into(),
            account: account.into(),
            token_id: String::new(),
            token_kind: String::new(),
            decision: "allow".into(),
            reason: String::new(),
        }
    }

    /// 2030-01-01T00:00:00Z, the replay's clock.
    const NOW: i64 = 1_893_456_000;

    /// A PAT record with a distinct (unused) digest, for `tenants`.
    fn pat(n: u8, id: &str, tenants: &str, extra: &str) -> String {
        format!(
            "  - id: {id}\n    sha256: {}\n    cube: {{ methods: [\"*\"], tags: [\"*\"], tenants: {tenants}, accounts: [\"*\"] }}\n{extra}",
            format!("{n:02x}").repeat(32),
        )
    }

    /// The configuration `edit` makes of the crate's test configuration,
    /// with `pats` as its PAT file, loaded from files in `dir` named by
    /// `name`.
    fn snapshot(dir: &std::path::Path, name: &str, edit: &str, pats: &[String]) -> Snapshot {
        let pat_file = dir.join(format!("{name}-tokens.yaml"));
        std::fs::write(&pat_file, format!("tokens:\n{}", pats.concat())).expect("write PATs");
        let mut text = format!(
            "{}tokens: {{ pat_file: \"{}\" }}\n",
            crate::config::TEST_CONFIG,
            pat_file.display()
        );
        if !edit.is_empty() {
            let (from, to) = edit.split_once(" => ").expect("an edit");
            assert!(text.contains(from), "{from}");
            text = text.replace(from, to);
        }
        crate::config::from_yaml(&text, &dir.join(format!("{name}.yaml")), &|_| None)
            .expect("a valid configuration")
    }

    /// The test configuration as it is and as `edit` makes it, with no PATs.
    fn current_and_candidate(edit: &str) -> (Snapshot, Snapshot) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cur = snapshot(dir.path(), "current", "", &[]);
        (cur, snapshot(dir.path(), "candidate", edit, &[]))
    }

    /// An access-log line as the gateway writes it (the fields replay reads).
    fn line(
        method: &str,
        route: &str,
        token: (&str, &str),
        decision: &str,
        reason: &str,
    ) -> String {
        let tenant = if route.contains("{tenant}") {
            "acme-prod"
        } else {
            ""
        };
        serde_json::json!({
            "timestamp": "2029-12-31T23:59:59.000000Z",
            "level": "INFO",
            "method": method,
            "route": route,
            "tag": if route.contains("rules") { "rules" } else { "" },
            "tenant": tenant,
            "account": if tenant.is_empty() { "" } else { "acme" },
            "token_id": token.0,
            "token_kind": token.1,
            "decision": decision,
            "reason": reason,
            "status": 200,
            "target": "scopegate::access",
        })
        .to_string()
    }

    const RULES: &str = "/v1/tenants/{tenant}/rules";
    const ALL: &str = "[\"*\"]";

    fn flips(r: &Report) -> Vec<(&str, &str, &str, u64)> {
        r.flips
            .iter()
            .map(|f| {
                (
                    f.direction.as_str(),
                    f.tag.as_str(),
                    f.reason.as_str(),
                    f.count,
                )
            })
            .collect()
    }

    /// A PAT is looked up by id in each configuration's PAT file: a
    /// narrowed cube, an expiry reached (to the second), a revocation and
    /// a removal each flip its requests, with the candidate's reason.
    #[test]
    fn pat_records_are_replayed_from_each_pat_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = [
            "tok_moved",
            "tok_expired",
            "tok_expiring",
            "tok_revoked",
            "tok_removed",
        ];
        let current: Vec<String> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| pat(i as u8, id, ALL, ""))
            .collect();
        let expires = |at: i64| {
            let t = time::OffsetDateTime::from_unix_timestamp(at).expect("time");
            format!(
                "    expires: \"{}\"\n",
                t.format(&time::format_description::well_known::Rfc3339)
                    .expect("format")
            )
        };
        let candidate = [
            pat(0, "tok_moved", "[acme-trial]", ""),
            pat(1, "tok_expired", ALL, &expires(NOW)),
            pat(2, "tok_expiring", ALL, &expires(NOW + 1)),
            pat(3, "tok_revoked", ALL, "    disabled: true\n"),
        ];
        let cur = snapshot(dir.path(), "current", "", &current);
        let cand = snapshot(dir.path(), "candidate", "", &candidate);
        let log: Vec<String> = ids
            .iter()
            .map(|id| line("GET", RULES, (id, "pat"), "allow", ""))
            .collect();
        let report = replay(&cur, &cand, log.iter().map(String::as_str), NOW);
        assert_eq!((report.replayed, report.unchanged, report.stale), (5, 1, 0));
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        assert_eq!(
            flips(&report),
            [
                ("allow→deny", "rules", "expired", 1),
                ("allow→deny", "rules", "revoked", 1),
                ("allow→deny", "rules", "tenant", 1),
                ("allow→deny", "rules", "unknown_token", 1),
            ]
        );
        // Which token each is: the one expiring a second later is not.
        let tokens: Vec<&str> = report
            .flips
            .iter()
            .filter_map(|f| f.example.rsplit_once("token=").map(|(_, t)| t))
            .collect();
        assert_eq!(
            tokens,
            ["tok_expired", "tok_revoked", "tok_moved", "tok_removed"]
        );
        // And back: each comes to be allowed, with the reason it had.
        let report = replay(&cand, &cur, log.iter().map(String::as_str), NOW);
        assert_eq!(report.flips.len(), 4);
        assert!(report.flips.iter().all(|f| f.direction == "deny→allow"));
        // The recorded decisions are the current configuration's own, and
        // so none is stale; against the candidate four are.
        assert_eq!(report.stale, 4);
    }

    /// A public request carried no token: when its route stops being
    /// public it is replayed without one.
    #[test]
    fn a_public_route_made_private_refuses_its_requests_for_want_of_a_token() {
        let (cur, cand) = current_and_candidate(
            "{ path: /v1/health, public: true } => { path: /v1/health, tag: rules }",
        );
        let log = [line("GET", "/v1/health", ("", ""), "public", "")];
        let report = replay(&cur, &cand, log.iter().map(String::as_str), NOW);
        assert_eq!((report.replayed, report.unchanged), (1, 0));
        assert_eq!(
            flips(&report),
            [("allow→deny", "rules", "missing_token", 1)]
        );
    }

    /// What the configuration did not decide is skipped, by why; a
    /// refusal before authentication is replayed without a token, and a
    /// line with a token but no kind is not guessed at.
    #[test]
    fn what_cannot_be_replayed_is_skipped_and_named() {
        let (cur, cand) =
            current_and_candidate("methods: [GET, POST] => methods: [GET, POST, DELETE]");
        let log = [
            // A JWT signed by a key the gateway did not know: its cube is
            // not in the log, and the candidate has the same keys.
            line("GET", RULES, ("jti-1", "jwt"), "deny", "unknown_key"),
            line("GET", RULES, ("", ""), "deny", "malformed_token"),
            line("GET", "", ("", ""), "deny", "bad_path"),
            line("GET", RULES, ("tok_x", ""), "deny", "plan"),
            line("GET", RULES, ("", ""), "allow", ""),
            // Refused for its method before any token was looked at.
            line("DELETE", RULES, ("", ""), "deny", "method_not_allowed"),
            "not json".into(),
            r#"{"target":"scopegate::reload","message":"reloaded"}"#.into(),
        ];
        let report = replay(&cur, &cand, log.iter().map(String::as_str), NOW);
        assert_eq!(
            report.skipped,
            BTreeMap::from([
                (
                    "ambiguous path (not decided by configuration)".to_string(),
                    1
                ),
                ("authentication (token not in the log)".to_string(), 2),
                ("token kind not recorded".to_string(), 2),
            ])
        );
        assert_eq!((report.replayed, report.unchanged, report.stale), (1, 0, 0));
        assert_eq!(
            flips(&report),
            [("deny→allow", "rules", "method_not_allowed", 1)]
        );
        assert_eq!(
            report.flips[0].example,
            "DELETE /v1/tenants/{tenant}/rules tenant=acme-prod account=acme token=-"
        );
    }

    #[test]
    fn paths_are_rebuilt_from_templates() {
        assert_eq!(
            rebuild_path(&rec(
                "/v1/tenants/{tenant}/rules/{rule_id}",
                "acme-prod",
                "acme"
            )),
            Some("/v1/tenants/acme-prod/rules/_".into())
        );
        assert_eq!(
            rebuild_path(&rec("/v1/accounts/{account}/team/{*rest}", "", "acme")),
            Some("/v1/accounts/acme/team/_".into())
        );
        assert_eq!(rebuild_path(&rec("/v1/tenants/{tenant}/x", "", "")), None);
        assert_eq!(rebuild_path(&rec("", "", "")), None);
        assert_eq!(rebuild_path(&rec("/v1/{broken", "", "")), None);
    }
}
