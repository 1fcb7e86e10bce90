//! scopegate: a reverse-proxy authorization gateway.
//!
//! Every request goes through named phases in a fixed order (see
//! [`decision`]): check path → match route → authenticate → authorize →
//! forward. Configuration is compiled into one immutable [`config::Snapshot`]
//! and published as a [`proxy::Generation`] with a single `ArcSwap` store.
//!
//! [`serve`] runs the proxy listener; tests and `main` both call it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod attenuate;
pub mod config;
pub mod decision;
pub mod diff;
pub mod error;
pub mod h1;
pub mod logging;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod scope;
pub mod server;
pub mod sources;
pub mod tls;
pub mod token;
pub mod upstream;
pub mod usage;

pub use config::{ConfigErrors, Snapshot};
pub use proxy::Gateway;
pub use server::serve;

/// A switch back to hyper read from `var`: `Ok(true)` when unset or set to
/// `ours` (the default, the gateway's own code), `Ok(false)` for `hyper`,
/// and an error naming the variable for anything else.
pub(crate) fn own_or_hyper(var: &str, ours: &str) -> Result<bool, String> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(true),
        Ok(v) if v == ours => Ok(true),
        Ok(v) if v == "hyper" => Ok(false),
        Ok(v) => Err(format!(
            "{var}={v:?}: expected \"{ours}\" (the default) or \"hyper\""
        )),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!(
            "{var} is not UTF-8: expected \"{ours}\" (the default) or \"hyper\""
        )),
    }
}
