//! The request phases before forwarding, in SPEC §6 order:
//! check path → match route → authenticate → authorize.
//!
//! Owns the order of the checks and what each phase does by default; the
//! checks themselves live in [`crate::path`], [`crate::routes`],
//! [`crate::token`] and [`crate::scope`]. Pure over one [`Snapshot`]: no I/O,
//! no clock of its own (`now` is passed in), so the proxy and `scopegate
//! explain` reach the same decision for the same request.
//!
//! Each phase:
//! 1. **path** — canonicalize; an ambiguous path is `400 bad_path`.
//! 2. **route** — match the canonical path; no match is `404`, a method the
//!    route does not accept is `405` with `Allow`; the `{tenant}` and
//!    `{account}` in the path must exist (and agree, when both are present),
//!    else `403 unknown_tenant` / `unknown_account`.
//! 3. **authenticate** — skipped for public routes; otherwise exactly one
//!    `Authorization: Bearer` header holding a PAT or a JWT.
//! 4. **authorize** — some cube admits method × route × tenant × account,
//!    then the effective plan admits (tag, method).

use std::borrow::Cow;

use http::{HeaderMap, Method};

use crate::config::Snapshot;
use crate::error::Reason;
use crate::routes::Route;
use crate::scope::{AccountId, MethodSet, PlanId, RouteId, Target, TenantId, authorize};
use crate::token::{self, AuthError, Principal, pat};

/// What the route phase established.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'s> {
    pub id: RouteId,
    pub route: &'s Route,
    pub tenant: Option<TenantId>,
    pub account: Option<AccountId>,
    pub plan: Option<PlanId>,
}

/// The names a route match resolved to, for logs, metric labels and
/// `explain`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Names<'s> {
    pub route: &'s str,
    /// `None` for public routes.
    pub tag: Option<&'s str>,
    pub tenant: Option<&'s str>,
    pub account: Option<&'s str>,
    pub plan: Option<&'s str>,
}

impl<'s> RouteMatch<'s> {
    pub fn names(&self, snap: &'s Snapshot) -> Names<'s> {
        Names {
            route: &self.route.template,
            tag: self
                .route
                .tag
                .and_then(|t| snap.tags.get(t as usize))
                .map(|s| &**s),
            tenant: self
                .tenant
                .and_then(|t| snap.tenants.get(t as usize))
                .map(|t| &*t.name),
            account: self
                .account
                .and_then(|a| snap.accounts.get(a as usize))
                .map(|a| &*a.name),
            plan: self
                .plan
                .and_then(|p| snap.plans.get(p as usize))
                .map(|p| &*p.name),
        }
    }
}

/// How far a request got and what was decided. Filled in phase by phase, so
/// a denial still carries what was known (for logs, metrics and `explain`).
#[derive(Debug)]
pub struct Outcome<'s, 'r> {
    /// The canonical path, once the path phase passed.
    pub path: Option<Cow<'r, str>>,
    pub matched: Option<RouteMatch<'s>>,
    pub principal: Option<Principal<'s>>,
    /// `Ok(true)` allowed after authorization, `Ok(false)` public route.
    pub verdict: Result<bool, Reason>,
}

/// Decide a request. `now` is Unix seconds.
pub fn decide<'s, 'r>(
    snap: &'s Snapshot,
    method: &Method,
    raw_path: &'r str,
    headers: &HeaderMap,
    now: i64,
) -> Outcome<'s, 'r> {
    decide_with(snap, method, raw_path, headers, now, None)
}

/// [`decide`], with the authentication phase's answer given instead of
/// computed: used after an asynchronous token source (a JWKS refetch has
/// already been folded into the snapshot; introspection answers here) so
/// that every other phase runs exactly as in [`decide`].
pub fn decide_with<'s, 'r>(
    snap: &'s Snapshot,
    method: &Method,
    raw_path: &'r str,
    headers: &HeaderMap,
    now: i64,
    authenticated: Option<Result<Principal<'s>, AuthError>>,
) -> Outcome<'s, 'r> {
    let mut out = Outcome {
        path: None,
        matched: None,
        principal: None,
        verdict: Err(Reason::BadPath),
    };
    if let Err(reason) = run(
        snap,
        method,
        raw_path,
        headers,
        now,
        authenticated,
        &mut out,
    ) {
        out.verdict = Err(reason);
    }
    out
}

fn run<'s, 'r>(
    snap: &'s Snapshot,
    method: &Method,
    raw_path: &'r str,
    headers: &HeaderMap,
    now: i64,
    authenticated: Option<Result<Principal<'s>, AuthError>>,
    out: &mut Outcome<'s, 'r>,
) -> Result<(), Reason> {
    // 1. path
    let path = crate::path::canonicalize(raw_path).map_err(|_| Reason::BadPath)?;
    let path = out.path.insert(path);

    // 2. route
    let (matched, routed) = route(snap, method, path);
    out.matched = matched;
    let method_bit = routed?;
    let Some(matched) = matched else {
        return Err(Reason::UnmappedRoute);
    };

    // 3. authenticate (public routes skip it and the authorization phase)
    let Some(tag) = matched.route.tag else {
        out.verdict = Ok(false);
        return Ok(());
    };
    let principal = match authenticated {
        Some(given) => given?,
        None => authenticate(snap, headers, now)?,
    };
    let principal = out.principal.insert(principal);

    // 4. authorize
    let target = Target {
        method: method_bit,
        route: matched.id,
        tag,
        tenant: matched.tenant,
        account: matched.account,
    };
    let plan = matched.plan.and_then(|p| snap.plans.get(p as usize));
    authorize(principal.cubes(), plan, &target)?;
    out.verdict = Ok(true);
    Ok(())
}

/// Phase 2: the route, and the request's method bit or why it is refused.
/// The match is returned even when the method or an id is refused, so a 405
/// can carry `Allow` and a denial can be counted under its tag.
fn route<'s>(
    snap: &'s Snapshot,
    method: &Method,
    path: &str,
) -> (Option<RouteMatch<'s>>, Result<MethodSet, Reason>) {
    let Some(m) = snap.routes.at(path) else {
        return (None, Err(Reason::UnmappedRoute));
    };
    let mut matched = RouteMatch {
        id: m.id,
        route: m.route,
        tenant: None,
        account: None,
        plan: None,
    };
    let Some(method_bit) = MethodSet::of_method(method).filter(|&b| m.route.methods.contains(b))
    else {
        return (Some(matched), Err(Reason::MethodNotAllowed));
    };
    if let Some(name) = m.tenant {
        let Some(t) = snap
            .tenant_ids
            .get(name)
            .and_then(|&id| snap.tenants.get(id as usize).map(|t| (id, t)))
        else {
            return (Some(matched), Err(Reason::UnknownTenant));
        };
        let (id, t) = t;
        matched.tenant = Some(id);
        matched.account = Some(t.account);
        matched.plan = Some(t.plan);
    }
    if let Some(name) = m.account {
        let Some(&id) = snap.account_ids.get(name) else {
            return (Some(matched), Err(Reason::UnknownAccount));
        };
        // A path naming both must name a tenant of that account; otherwise
        // the request is ambiguous about whose data it touches.
        if matched.account.is_some_and(|a| a != id) {
            return (Some(matched), Err(Reason::UnknownTenant));
        }
        matched.account = Some(id);
        if matched.plan.is_none() {
            let Some(a) = snap.accounts.get(id as usize) else {
                return (Some(matched), Err(Reason::UnknownAccount));
            };
            matched.plan = Some(a.plan);
        }
    }
    (Some(matched), Ok(method_bit))
}

/// Phase 3 alone: the bearer token of `headers`, verified against `snap`.
pub fn authenticate<'s>(
    snap: &'s Snapshot,
    headers: &HeaderMap,
    now: i64,
) -> Result<Principal<'s>, AuthError> {
    let token = token::bearer(headers)?;
    if token.starts_with(pat::PREFIX) {
        snap.pats.authenticate(token, now)
    } else {
        // The JWT verifier checks the three-part shape itself (on a cache
        // miss); anything else is `malformed_token` there.
        snap.jwt.authenticate(token, now, &snap.vocabulary())
    }
}
