//! The route table (SPEC §1, §3 `routes`, §6 step 2).
//!
//! Owns the matchit router from canonical paths to route entries and the
//! per-route facts the decision needs (tag, accepted methods, public flag,
//! which parameters carry the tenant and account). Templates are inserted
//! when a snapshot is built, so a bad or conflicting template is a config
//! error at load time and never a request-time surprise.

use std::collections::HashMap;

use http::HeaderValue;

use crate::scope::{MethodSet, RouteId, TagId};

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub template: Box<str>,
    /// `None` for public routes.
    pub tag: Option<TagId>,
    pub methods: MethodSet,
    pub allow: HeaderValue,
    pub has_tenant: bool,
    pub has_account: bool,
}

impl Route {
    pub fn is_public(&self) -> bool {
        self.tag.is_none()
    }
}

/// A matched request path.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'s, 'p> {
    pub id: RouteId,
    pub route: &'s Route,
    pub tenant: Option<&'p str>,
    pub account: Option<&'p str>,
}

/// Templates → routes, built once per snapshot.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    router: matchit::Router<RouteId>,
    routes: Vec<Route>,
    by_template: HashMap<Box<str>, RouteId>,
}

/// A template the table refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(pub String);

/// Parameter names in a matchit template, catch-alls included (without `*`).
fn params(template: &str) -> impl Iterator<Item = &str> {
    template.split('{').skip(1).filter_map(|rest| {
        let name = rest.split('}').next()?;
        Some(name.trim_start_matches('*'))
    })
}

impl RouteTable {
    /// Add a route. `tag` is `None` for public routes.
    pub fn insert(
        &mut self,
        template: &str,
        tag: Option<TagId>,
        methods: MethodSet,
    ) -> Result<RouteId, RouteError> {
        if !template.starts_with('/') {
            return Err(RouteError(format!(
                "template `{template}` must start with '/'"
            )));
        }
        if self.by_template.contains_key(template) {
            return Err(RouteError(format!("template `{template}` is listed twice")));
        }
        let mut has_tenant = false;
        let mut has_account = false;
        for p in params(template) {
            match p {
                "tenant" if has_tenant => {
                    return Err(RouteError(format!(
                        "template `{template}` names {{tenant}} twice"
                    )));
                }
                "account" if has_account => {
                    return Err(RouteError(format!(
                        "template `{template}` names {{account}} twice"
                    )));
                }
                "tenant" => has_tenant = true,
                "account" => has_account = true,
                _ => {}
            }
        }
        // A catch-all named tenant/account would put a multi-segment value on
        // an identity axis; refuse it.
        if template.contains("{*tenant}") || template.contains("{*account}") {
            return Err(RouteError(format!(
                "template `{template}`: {{tenant}} and {{account}} must be single segments"
            )));
        }
        let id = RouteId::try_from(self.routes.len())
            .map_err(|_| RouteError("too many routes".into()))?;
        self.router
            .insert(template, id)
            .map_err(|e| RouteError(format!("template `{template}`: {e}")))?;
        let allow = HeaderValue::from_str(&methods.allow_header())
            .map_err(|_| RouteError("unrepresentable Allow header".into()))?;
        self.routes.push(Route {
            template: template.into(),
            tag,
            methods,
            allow,
            has_tenant,
            has_account,
        });
        self.by_template.insert(template.into(), id);
        Ok(id)
    }

    /// Match a canonical path.
    pub fn at<'s, 'p>(&'s self, path: &'p str) -> Option<Matched<'s, 'p>>
    where
        's: 'p,
    {
        let m = self.router.at(path).ok()?;
        let id = *m.value;
        let route = self.routes.get(id as usize)?;
        let tenant = if route.has_tenant {
            Some(m.params.get("tenant")?)
        } else {
            None
        };
        let account = if route.has_account {
            Some(m.params.get("account")?)
        } else {
            None
        };
        Some(Matched {
            id,
            route,
            tenant,
            account,
        })
    }

    pub fn get(&self, id: RouteId) -> Option<&Route> {
        self.routes.get(id as usize)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// Template → route id, for exact-path overrides in cubes.
    pub fn templates(&self) -> &HashMap<Box<str>, RouteId> {
        &self.by_template
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let mut t = RouteTable::default();
        for (tpl, tag) in [
            ("/v1/health", None),
            ("/v1/tenants/{tenant}/analytics/{*rest}", Some(0)),
            ("/v1/tenants/{tenant}/rules", Some(1)),
            ("/v1/tenants/{tenant}/rules/{rule_id}", Some(1)),
            ("/v1/accounts/{account}", Some(4)),
            ("/v1/accounts/{account}/team/{*rest}", Some(5)),
        ] {
            t.insert(tpl, tag, MethodSet::ALL).expect("insert");
        }
        t
    }

    #[test]
    fn matches_params_and_catch_all() {
        let t = table();
        let m = t.at("/v1/tenants/acme-prod/rules/r1").expect("match");
        assert_eq!(&*m.route.template, "/v1/tenants/{tenant}/rules/{rule_id}");
        assert_eq!(m.tenant, Some("acme-prod"));
        assert_eq!(m.account, None);
        let m = t.at("/v1/tenants/t/analytics/a/b/c").expect("catch-all");
        assert_eq!(m.route.tag, Some(0));
        let m = t.at("/v1/accounts/acme").expect("account");
        assert_eq!(m.account, Some("acme"));
        assert!(t.at("/v1/health").expect("public").route.is_public());
        assert_eq!((t.len(), t.is_empty()), (6, false));
        assert!(RouteTable::default().is_empty());
    }

    #[test]
    fn non_matches() {
        let t = table();
        assert!(t.at("/v1/tenants/acme-prod").is_none());
        assert!(t.at("/v1/tenants/acme-prod/rules/r1/x").is_none());
        // A catch-all needs at least one segment.
        assert!(t.at("/v1/tenants/t/analytics/").is_none());
        assert!(t.at("/v1/tenants/t/analytics").is_none());
        assert!(t.at("/v2/health").is_none());
    }

    #[test]
    fn conflicts_and_bad_templates_are_load_errors() {
        let mut t = table();
        assert!(t.insert("/v1/health", None, MethodSet::ALL).is_err());
        assert!(
            t.insert("/v1/tenants/{t}/rules", Some(1), MethodSet::ALL)
                .is_err()
        );
        assert!(
            t.insert("/v1/x/{unclosed", Some(1), MethodSet::ALL)
                .is_err()
        );
        assert!(t.insert("v1/x", Some(1), MethodSet::ALL).is_err());
        // An identity parameter named twice would leave which segment is
        // checked to the router: refused, by name.
        for (tpl, name) in [
            ("/v1/y/{tenant}/{tenant}", "{tenant}"),
            ("/v1/y/{account}/x/{account}", "{account}"),
        ] {
            let e = t.insert(tpl, Some(1), MethodSet::ALL).expect_err(tpl);
            assert!(
                e.0.contains(&format!("names {name} twice")),
                "{tpl}: {}",
                e.0
            );
        }
        assert!(
            t.insert("/v1/z/{*tenant}", Some(1), MethodSet::ALL)
                .is_err()
        );
    }
}
