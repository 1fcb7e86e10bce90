//! Scope cubes, plans and the authorization decision (SPEC §4, §6 step 4).
//!
//! Owns the compiled, index-based form of a cube and a plan, and the pure
//! function that says whether a verified principal may make a matched
//! request. It knows nothing of HTTP or tokens; it must never consult
//! anything but the snapshot it is handed, so a decision cannot outlive the
//! configuration generation it was made on.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Dense index of a tag in the snapshot's tag table.
pub type TagId = u32;
/// Dense index of a route in the snapshot's route table.
pub type RouteId = u32;
/// Dense index of a tenant in the snapshot.
pub type TenantId = u32;
/// Dense index of an account in the snapshot.
pub type AccountId = u32;
/// Dense index of a plan in the snapshot.
pub type PlanId = u32;

/// The five methods a route or cube can name, as a bit set. HEAD is checked
/// as GET everywhere, so it has no bit of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MethodSet(u8);

impl MethodSet {
    pub const GET: MethodSet = MethodSet(1);
    pub const POST: MethodSet = MethodSet(2);
    pub const PUT: MethodSet = MethodSet(4);
    pub const PATCH: MethodSet = MethodSet(8);
    pub const DELETE: MethodSet = MethodSet(16);
    pub const ALL: MethodSet = MethodSet(31);
    pub const NONE: MethodSet = MethodSet(0);

    const NAMES: [(&'static str, MethodSet); 5] = [
        ("GET", MethodSet::GET),
        ("POST", MethodSet::POST),
        ("PUT", MethodSet::PUT),
        ("PATCH", MethodSet::PATCH),
        ("DELETE", MethodSet::DELETE),
    ];

    /// Parse a list of method names as written in config or claims: the five
    /// names (upper case, as HTTP spells them) or `"*"`.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<MethodSet, String> {
        let mut set = MethodSet::NONE;
        for name in names {
            let name = name.as_ref();
            if name == "*" {
                set = MethodSet::ALL;
                continue;
            }
            match Self::NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, m)) => set.0 |= m.0,
                None => {
                    return Err(format!(
                        "unknown method `{name}` (expected GET, POST, PUT, PATCH, DELETE or \"*\")"
                    ));
                }
            }
        }
        Ok(set)
    }

    /// The bit for a request method; HEAD maps to GET. Methods outside the
    /// five (OPTIONS, TRACE, CONNECT, extensions) have no bit.
    pub fn of_method(m: &http::Method) -> Option<MethodSet> {
        Some(match *m {
            http::Method::GET | http::Method::HEAD => MethodSet::GET,
            http::Method::POST => MethodSet::POST,
            http::Method::PUT => MethodSet::PUT,
            http::Method::PATCH => MethodSet::PATCH,
            http::Method::DELETE => MethodSet::DELETE,
            _ => return None,
        })
    }

    pub fn contains(self, m: MethodSet) -> bool {
        m.0 != 0 && self.0 & m.0 == m.0
    }

    pub fn is_subset(self, other: MethodSet) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn union(self, other: MethodSet) -> MethodSet {
        MethodSet(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Method names in this set, in a fixed order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .filter(move |(_, m)| self.contains(*m))
            .map(|(n, _)| *n)
    }

    /// The `Allow` header value for a route accepting this set (GET implies HEAD).
    pub fn allow_header(self) -> String {
        let mut v: Vec<&str> = Vec::new();
        for n in self.names() {
            v.push(n);
            if n == "GET" {
                v.push("HEAD");
            }
        }
        v.join(", ")
    }
}

/// A set of dense ids, or every id (`"*"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSet {
    Any,
    /// Nothing (an empty or absent list, or only unknown names).
    None,
    /// Exactly one id, inline: the common case costs no allocation.
    One(u32),
    /// Two or more ids, sorted and deduplicated.
    Many(Box<[u32]>),
}

impl IdSet {
    pub fn contains(&self, id: u32) -> bool {
        match self {
            IdSet::Any => true,
            IdSet::None => false,
            IdSet::One(one) => *one == id,
            IdSet::Many(ids) => ids.binary_search(&id).is_ok(),
        }
    }

    /// Every id of `self` is in `other` (`Any` only within `Any`).
    pub fn is_subset(&self, other: &IdSet) -> bool {
        match (self, other) {
            (_, IdSet::Any) | (IdSet::None, _) => true,
            (IdSet::Any, _) => false,
            (IdSet::One(id), o) => o.contains(*id),
            (IdSet::Many(ids), o) => ids.iter().all(|id| o.contains(*id)),
        }
    }

    /// The ids, or `None` for `Any`.
    pub fn ids(&self) -> Option<&[u32]> {
        match self {
            IdSet::Any => None,
            IdSet::None => Some(&[]),
            IdSet::One(id) => Some(std::slice::from_ref(id)),
            IdSet::Many(ids) => Some(ids),
        }
    }

    fn from_ids(mut ids: Vec<u32>) -> IdSet {
        ids.sort_unstable();
        ids.dedup();
        match ids.as_slice() {
            [] => IdSet::None,
            [one] => IdSet::One(*one),
            _ => IdSet::Many(ids.into_boxed_slice()),
        }
    }
}

/// One compiled grant: methods × (tags ∪ exact routes) × tenants × accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cube {
    pub methods: MethodSet,
    pub tags: IdSet,
    pub routes: IdSet,
    pub tenants: IdSet,
    pub accounts: IdSet,
}

/// The axis on which a cube refused a request, in SPEC order: a later axis
/// means the cube "got further".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Axis {
    Method,
    Path,
    Tenant,
    Account,
}

/// What the decision needs to know about a matched request.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub method: MethodSet,
    pub route: RouteId,
    pub tag: TagId,
    pub tenant: Option<TenantId>,
    pub account: Option<AccountId>,
}

impl Cube {
    /// Whether this cube admits the target, or the first axis it refuses.
    pub fn check(&self, t: &Target) -> Result<(), Axis> {
        if !self.methods.contains(t.method) {
            return Err(Axis::Method);
        }
        if !(self.tags.contains(t.tag) || self.routes.contains(t.route)) {
            return Err(Axis::Path);
        }
        if let Some(tenant) = t.tenant
            && !self.tenants.contains(tenant)
        {
            return Err(Axis::Tenant);
        }
        if let Some(account) = t.account
            && !self.accounts.contains(account)
        {
            return Err(Axis::Account);
        }
        Ok(())
    }
}

/// Why authorization refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No cube admitted it; the axis of the cube that got furthest.
    Cube(Axis),
    /// Some cube admitted it, but the effective plan does not allow (tag, method),
    /// or there is no plan to consult (a route with neither tenant nor account).
    Plan,
}

/// Union of cubes, then the plan ceiling (SPEC §4, last paragraph).
pub fn authorize(cubes: &[Cube], plan: Option<&Plan>, t: &Target) -> Result<(), Refusal> {
    let mut furthest: Option<Axis> = None;
    let mut admitted = false;
    for cube in cubes {
        match cube.check(t) {
            Ok(()) => {
                admitted = true;
                break;
            }
            Err(axis) => furthest = furthest.max(Some(axis)),
        }
    }
    if !admitted {
        return Err(Refusal::Cube(furthest.unwrap_or(Axis::Method)));
    }
    match plan {
        Some(p) if p.admits(t.tag, t.method) => Ok(()),
        _ => Err(Refusal::Plan),
    }
}

/// A compiled plan: for each tag id, the methods the plan allows on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: Box<str>,
    per_tag: Box<[MethodSet]>,
}

impl Plan {
    pub fn new(name: &str, per_tag: Vec<MethodSet>) -> Plan {
        Plan {
            name: name.into(),
            per_tag: per_tag.into_boxed_slice(),
        }
    }

    pub fn admits(&self, tag: TagId, method: MethodSet) -> bool {
        self.per_tag
            .get(tag as usize)
            .is_some_and(|m| m.contains(method))
    }
}

/// A cube as written in token claims and PAT records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CubeSpec {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default)]
    pub tenants: Vec<String>,
    #[serde(default)]
    pub accounts: Vec<String>,
    /// A role from gateway.yaml `roles:`: its methods, tags and paths are
    /// added to this cube's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A named grant on the method and path axes (gateway.yaml `roles:`),
/// used as `role:` in a cube or as a word in a JWT `scope` claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
}

/// The verbs of `tag:verb` scope strings.
const READ: &[&str] = &["GET"];
const WRITE: &[&str] = &["POST", "PUT", "PATCH", "DELETE"];

/// Cubes from an OAuth-style `scope` claim (space-separated), bounded by the
/// token's `tenants` and `accounts` claims:
/// - `analytics:read` → GET (and HEAD) on tag `analytics`;
/// - `rules:write` → POST, PUT, PATCH, DELETE on tag `rules`;
/// - `markers:*` → every method; `*:read` → GET on every tag;
/// - a bare word naming a role of gateway.yaml → that role.
///
/// Anything else (`openid`, another API's `read:user`) grants nothing: a
/// scope we do not understand is never widened into access.
pub fn scope_cubes(
    scope: &str,
    tenants: &[String],
    accounts: &[String],
    roles: &HashMap<Box<str>, RoleSpec>,
) -> Vec<CubeSpec> {
    let mut out = Vec::new();
    for word in scope.split(' ').filter(|w| !w.is_empty()) {
        let base = CubeSpec {
            tenants: tenants.to_vec(),
            accounts: accounts.to_vec(),
            ..CubeSpec::default()
        };
        match word.split_once(':') {
            Some((tag, verb)) if !tag.is_empty() => {
                let methods: &[&str] = match verb {
                    "read" => READ,
                    "write" => WRITE,
                    "*" => &["*"],
                    _ => continue,
                };
                out.push(CubeSpec {
                    methods: methods.iter().map(|m| m.to_string()).collect(),
                    tags: vec![tag.to_string()],
                    ..base
                });
            }
            Some(_) => {}
            None if roles.contains_key(word) => out.push(CubeSpec {
                role: Some(word.to_string()),
                ..base
            }),
            None => {}
        }
    }
    out
}

/// The names a cube may refer to, from one snapshot.
pub struct Vocabulary<'a> {
    pub tags: &'a HashMap<Box<str>, TagId>,
    pub routes: &'a HashMap<Box<str>, RouteId>,
    pub tenants: &'a crate::config::NameIds<TenantId>,
    pub accounts: &'a crate::config::NameIds<AccountId>,
    pub roles: &'a HashMap<Box<str>, RoleSpec>,
}

/// How to treat names the snapshot does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// PAT records: an unknown method, tag or path is a typo and an error
    /// (it must not silently change access). Unknown tenants and accounts
    /// grant nothing, so a tenant can be retired without editing every record.
    Config,
    /// Token claims: an unknown method is a malformed scope; every other
    /// unknown name grants nothing (the issuer may know tags we do not).
    Claims,
}

fn ids<S: std::hash::BuildHasher>(
    names: &[String],
    table: &HashMap<Box<str>, u32, S>,
    strict: bool,
    what: &str,
) -> Result<IdSet, String> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        if n == "*" {
            return Ok(IdSet::Any);
        }
        match table.get(n.as_str()) {
            Some(&id) => out.push(id),
            None if strict => return Err(format!("unknown {what} `{n}`")),
            None => {}
        }
    }
    Ok(IdSet::from_ids(out))
}

impl CubeSpec {
    /// Compile against a snapshot's names.
    pub fn compile(&self, v: &Vocabulary<'_>, strictness: Strictness) -> Result<Cube, String> {
        let strict = strictness == Strictness::Config;
        // A role adds its methods, tags and paths to the cube's own.
        let with_role;
        let (method_names, tag_names, path_names) = match &self.role {
            None => (&self.methods, &self.tags, &self.paths),
            Some(name) => {
                let role = v
                    .roles
                    .get(name.as_str())
                    .ok_or_else(|| format!("unknown role `{name}`"))?;
                let join = |a: &[String], b: &[String]| [a, b].concat();
                with_role = (
                    join(&self.methods, &role.methods),
                    join(&self.tags, &role.tags),
                    join(&self.paths, &role.paths),
                );
                (&with_role.0, &with_role.1, &with_role.2)
            }
        };
        let methods = MethodSet::parse(method_names)?;
        let tags = ids(tag_names, v.tags, strict, "tag")?;
        // "*" is not a path template; treat it as a literal (never matches).
        let routes = match ids(path_names, v.routes, strict, "path template")? {
            IdSet::Any => {
                return Err("`paths` takes route templates, not \"*\" (use tags: [\"*\"])".into());
            }
            s => s,
        };
        let tenants = ids(&self.tenants, v.tenants, false, "tenant")?;
        let accounts = ids(&self.accounts, v.accounts, false, "account")?;
        Ok(Cube {
            methods,
            tags,
            routes,
            tenants,
            accounts,
        })
    }
}

/// `cube` or `cubes`, exactly one of them, non-empty.
pub fn cube_list<'a>(
    cube: &'a Option<CubeSpec>,
    cubes: &'a Option<Vec<CubeSpec>>,
) -> Result<&'a [CubeSpec], &'static str> {
    match (cube, cubes) {
        (Some(c), None) => Ok(std::slice::from_ref(c)),
        (None, Some(cs)) if !cs.is_empty() => Ok(cs),
        (None, Some(_)) => Err("`cubes` is empty"),
        (Some(_), Some(_)) => Err("both `cube` and `cubes` are present"),
        (None, None) => Err("neither `cube` nor `cubes` is present"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(
        methods: MethodSet,
        tags: &[u32],
        tenants: Option<&[u32]>,
        accounts: Option<&[u32]>,
    ) -> Cube {
        let set = |o: Option<&[u32]>| match o {
            None => IdSet::Any,
            Some(ids) => IdSet::from_ids(ids.to_vec()),
        };
        Cube {
            methods,
            tags: IdSet::from_ids(tags.to_vec()),
            routes: IdSet::from_ids(vec![]),
            tenants: set(tenants),
            accounts: set(accounts),
        }
    }

    fn target(method: MethodSet, tag: u32, tenant: Option<u32>, account: Option<u32>) -> Target {
        Target {
            method,
            route: 7,
            tag,
            tenant,
            account,
        }
    }

    #[test]
    fn id_sets_take_the_smallest_form_and_answer_alike() {
        assert_eq!(IdSet::from_ids(vec![]), IdSet::None);
        assert_eq!(IdSet::from_ids(vec![3, 3]), IdSet::One(3));
        assert_eq!(
            IdSet::from_ids(vec![9, 3, 9, 5]),
            IdSet::Many(vec![3, 5, 9].into_boxed_slice())
        );
        let many = IdSet::from_ids(vec![9, 3, 5]);
        for id in 0..12 {
            assert_eq!(many.contains(id), [3, 5, 9].contains(&id), "{id}");
            assert_eq!(IdSet::One(5).contains(id), id == 5);
            assert!(!IdSet::None.contains(id));
            assert!(IdSet::Any.contains(id));
        }
    }

    #[test]
    fn method_names_parse_and_reject() {
        assert_eq!(MethodSet::parse(&["GET", "POST"]).ok(), Some(MethodSet(3)));
        assert_eq!(MethodSet::parse(&["*"]).ok(), Some(MethodSet::ALL));
        assert!(MethodSet::parse(&["get"]).is_err());
        assert!(MethodSet::parse(&["HEAD"]).is_err());
        assert_eq!(
            MethodSet::ALL.allow_header(),
            "GET, HEAD, POST, PUT, PATCH, DELETE"
        );
        assert_eq!(MethodSet::POST.allow_header(), "POST");
        assert!(!MethodSet::ALL.contains(MethodSet::NONE));
    }

    #[test]
    fn furthest_axis_wins_across_cubes() {
        let plan = Plan::new("pro", vec![MethodSet::ALL; 4]);
        // cube A fails on method, cube B gets to the tenant axis.
        let a = cube(MethodSet::GET, &[1], None, None);
        let b = cube(MethodSet::POST, &[1], Some(&[9]), Some(&[0]));
        let t = target(MethodSet::POST, 1, Some(3), Some(0));
        assert_eq!(
            authorize(&[a.clone(), b.clone()], Some(&plan), &t),
            Err(Refusal::Cube(Axis::Tenant))
        );
        assert_eq!(
            authorize(&[b, a], Some(&plan), &t),
            Err(Refusal::Cube(Axis::Tenant))
        );
    }

    #[test]
    fn account_axis_and_union() {
        let plan = Plan::new("pro", vec![MethodSet::ALL; 4]);
        let only_acct1 = cube(MethodSet::ALL, &[2], None, Some(&[1]));
        let t = target(MethodSet::GET, 2, Some(5), Some(0));
        assert_eq!(
            authorize(std::slice::from_ref(&only_acct1), Some(&plan), &t),
            Err(Refusal::Cube(Axis::Account))
        );
        let acct0 = cube(MethodSet::ALL, &[2], None, Some(&[0]));
        assert_eq!(authorize(&[only_acct1, acct0], Some(&plan), &t), Ok(()));
    }

    #[test]
    fn tenant_axis_skipped_on_account_routes() {
        let plan = Plan::new("pro", vec![MethodSet::ALL; 4]);
        let c = cube(MethodSet::GET, &[0], Some(&[]), Some(&[0]));
        assert_eq!(
            authorize(
                std::slice::from_ref(&c),
                Some(&plan),
                &target(MethodSet::GET, 0, None, Some(0))
            ),
            Ok(())
        );
        assert_eq!(
            authorize(
                &[c],
                Some(&plan),
                &target(MethodSet::GET, 0, Some(1), Some(0))
            ),
            Err(Refusal::Cube(Axis::Tenant))
        );
    }

    #[test]
    fn plan_is_a_ceiling_checked_after_a_cube_admits() {
        let mut per_tag = vec![MethodSet::ALL; 3];
        per_tag[1] = MethodSet::GET;
        let free = Plan::new("free", per_tag);
        let broad = cube(MethodSet::ALL, &[0, 1, 2], None, None);
        assert_eq!(
            authorize(
                std::slice::from_ref(&broad),
                Some(&free),
                &target(MethodSet::POST, 1, None, Some(0))
            ),
            Err(Refusal::Plan)
        );
        assert_eq!(
            authorize(
                std::slice::from_ref(&broad),
                Some(&free),
                &target(MethodSet::GET, 1, None, Some(0))
            ),
            Ok(())
        );
        // No plan to consult: refused on plan, never a pass.
        assert_eq!(
            authorize(&[broad], None, &target(MethodSet::GET, 1, None, None)),
            Err(Refusal::Plan)
        );
        // A cube refusal is reported before the plan is looked at.
        let narrow = cube(MethodSet::GET, &[0], None, None);
        assert_eq!(
            authorize(
                &[narrow],
                Some(&free),
                &target(MethodSet::POST, 1, None, None)
            ),
            Err(Refusal::Cube(Axis::Method))
        );
    }

    #[test]
    fn empty_cube_list_refuses() {
        let plan = Plan::new("pro", vec![MethodSet::ALL]);
        assert_eq!(
            authorize(&[], Some(&plan), &target(MethodSet::GET, 0, None, None)),
            Err(Refusal::Cube(Axis::Method))
        );
    }

    #[test]
    fn exactly_one_of_cube_and_cubes() {
        assert!(cube_list(&None, &None).is_err());
        assert!(cube_list(&Some(CubeSpec::default()), &Some(vec![])).is_err());
        assert!(cube_list(&None, &Some(vec![])).is_err());
        assert_eq!(
            cube_list(&Some(CubeSpec::default()), &None).map(|v| v.len()),
            Ok(1)
        );
        assert_eq!(
            cube_list(&None, &Some(vec![CubeSpec::default(); 2])).map(|v| v.len()),
            Ok(2)
        );
    }

    #[test]
    fn scope_strings_map_to_cubes_and_unknown_words_grant_nothing() {
        let mut roles = HashMap::new();
        roles.insert(
            "viewer".into(),
            RoleSpec {
                methods: vec!["GET".into()],
                tags: vec!["*".into()],
                paths: vec![],
            },
        );
        let t = vec!["acme-prod".to_string()];
        let a = vec!["acme".to_string()];
        let cubes = scope_cubes(
            "  analytics:read rules:write markers:* viewer openid read:user :read x:admin",
            &t,
            &a,
            &roles,
        );
        let got: Vec<(Vec<String>, Vec<String>, Option<String>)> = cubes
            .iter()
            .map(|c| (c.methods.clone(), c.tags.clone(), c.role.clone()))
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // `openid`, `read:user` (verb `user`), `:read` and `x:admin` are
        // not ours and grant nothing.
        assert_eq!(
            got,
            vec![
                (s(&["GET"]), s(&["analytics"]), None),
                (s(&["POST", "PUT", "PATCH", "DELETE"]), s(&["rules"]), None),
                (s(&["*"]), s(&["markers"]), None),
                (vec![], vec![], Some("viewer".to_string())),
            ]
        );
        assert!(cubes.iter().all(|c| c.tenants == t && c.accounts == a));
    }

    #[test]
    fn subsets_on_each_kind_of_set() {
        let many = IdSet::Many(vec![1, 2, 3].into_boxed_slice());
        assert!(IdSet::None.is_subset(&IdSet::None));
        assert!(IdSet::One(2).is_subset(&many));
        assert!(!IdSet::One(4).is_subset(&many));
        assert!(IdSet::Many(vec![1, 3].into_boxed_slice()).is_subset(&many));
        assert!(!IdSet::Many(vec![1, 4].into_boxed_slice()).is_subset(&many));
        assert!(many.is_subset(&IdSet::Any));
        assert!(!IdSet::Any.is_subset(&many));
        assert!(IdSet::Any.is_subset(&IdSet::Any));
        assert!(!IdSet::One(1).is_subset(&IdSet::None));
        assert!(MethodSet::GET.is_subset(MethodSet::ALL));
        assert!(!MethodSet::ALL.is_subset(MethodSet::GET.union(MethodSet::POST)));
        assert!(MethodSet::NONE.is_subset(MethodSet::NONE));
    }

    #[test]
    fn each_request_method_has_its_bit() {
        use http::Method;
        for (m, bit) in [
            (Method::GET, Some(MethodSet::GET)),
            (Method::HEAD, Some(MethodSet::GET)),
            (Method::POST, Some(MethodSet::POST)),
            (Method::PUT, Some(MethodSet::PUT)),
            (Method::PATCH, Some(MethodSet::PATCH)),
            (Method::DELETE, Some(MethodSet::DELETE)),
            (Method::OPTIONS, None),
            (Method::TRACE, None),
            (Method::CONNECT, None),
        ] {
            assert_eq!(MethodSet::of_method(&m), bit, "{m}");
        }
        // Overlapping sets: the union keeps what both hold.
        let get_post = MethodSet::GET.union(MethodSet::POST);
        let both = get_post.union(MethodSet::POST.union(MethodSet::PUT));
        assert!(both.contains(MethodSet::POST));
        assert_eq!(both, get_post.union(MethodSet::PUT));
        assert!(MethodSet::NONE.is_empty());
        assert!(!MethodSet::PATCH.is_empty());
    }
}
