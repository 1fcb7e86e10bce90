//! The `scopegate` command line (SPEC §2): serve, check, explain, demo,
//! token new. Tracing setup and process signals live here; everything else
//! is in the library. The only place `anyhow` is used.

/// mimalloc: under load glibc malloc held ~5x the live heap (see
/// bench/memory.sh and BENCHMARKS.md); the library does not choose.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use scopegate::config::{self, Snapshot};
use scopegate::decision::decide;
use scopegate::scope::{CubeSpec, MethodSet, Strictness, Target};
use scopegate::token::pat::{self, PatRecordSpec};
use scopegate::{Gateway, admin};

#[derive(Parser)]
#[command(
    name = "scopegate",
    version,
    about = "Authorization gateway: scope cubes and plans in front of the Airbrx API"
)]
struct Cli {
    /// Path to gateway.yaml.
    #[arg(long, global = true, default_value = "gateway.yaml")]
    config: PathBuf,
    /// Log format for `serve` and `demo`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate every file, print a summary; exit 0 when valid, 1 when not.
    Check,
    /// Print the decision for one request as JSON; exit 0 allow, 1 deny.
    Explain {
        /// The bearer token to evaluate.
        #[arg(long)]
        token: Option<String>,
        /// HTTP method, e.g. GET.
        method: String,
        /// Request path (a query string is ignored), e.g. /v1/tenants/acme-prod/rules.
        path: String,
    },
    /// Run the gateway on the shipped example with a built-in stand-in API.
    Demo {
        /// Where the demo gateway listens (default: the config's listen.addr,
        /// or a free port when that one is taken).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// The smallest cube covering what a token actually used, from a
    /// running gateway's admin listener.
    Suggest {
        /// The admin listener, host:port.
        #[arg(long)]
        admin: String,
        /// The token id (PAT record id, JWT jti or sub).
        #[arg(long)]
        token_id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replay the decisions of a JSON access log against the current and a
    /// candidate configuration; print what would flip, grouped by tag, plan
    /// and reason. Exit 0 when nothing flips, 1 when something does.
    Diff {
        /// The configuration to compare against (the --config one is current).
        #[arg(long)]
        candidate: PathBuf,
        /// The access log (JSON lines, as `serve` writes them).
        #[arg(long)]
        log: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Personal access tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a PAT: print the secret once and the record to paste into the PAT file.
    New {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// RFC 3339 expiry, e.g. 2027-06-30T00:00:00Z.
        #[arg(long)]
        expires: Option<String>,
        /// The cube as JSON, e.g. '{"methods":["GET"],"tags":["analytics"],"tenants":["acme-prod"],"accounts":["acme"]}'.
        #[arg(long)]
        cube: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime().and_then(|rt| rt.block_on(serve(&cli.config, cli.log_format))),
        Command::Check => check(&cli.config),
        Command::Explain {
            token,
            method,
            path,
        } => explain(&cli.config, token.as_deref(), &method, &path),
        Command::Suggest {
            admin,
            token_id,
            json,
        } => runtime().and_then(|rt| rt.block_on(suggest(&admin, &token_id, json))),
        Command::Diff {
            candidate,
            log,
            json,
        } => diff(&cli.config, &candidate, &log, json),
        Command::Demo { listen } => {
            runtime().and_then(|rt| rt.block_on(demo(&cli.config, listen, cli.log_format)))
        }
        Command::Token {
            command:
                TokenCommand::New {
                    id,
                    name,
                    expires,
                    cube,
                },
        } => token_new(&cli.config, &id, name, expires, &cube),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("scopegate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `scopegate diff`.
fn diff(current: &Path, candidate: &Path, log: &Path, json_out: bool) -> Result<ExitCode> {
    let cur = load(current, &config::process_env)?;
    let cand = load(candidate, &config::process_env)?;
    let text =
        std::fs::read_to_string(log).map_err(|e| anyhow!("{}: cannot read: {e}", log.display()))?;
    let report = scopegate::diff::replay(&cur, &cand, text.lines(), unix_now());
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let (to_deny, to_allow): (Vec<_>, Vec<_>) = report
            .flips
            .iter()
            .partition(|f| f.direction == "allow→deny");
        let n = |v: &[&scopegate::diff::Flip]| v.iter().map(|f| f.count).sum::<u64>();
        println!(
            "replayed {}: {} would flip ({} allow→deny, {} deny→allow), {} unchanged",
            counted(report.replayed, "request"),
            n(&to_deny) + n(&to_allow),
            n(&to_deny),
            n(&to_allow),
            report.unchanged
        );
        for (title, group) in [("allow → deny", &to_deny), ("deny → allow", &to_allow)] {
            if group.is_empty() {
                continue;
            }
            println!("{title}:");
            for f in group.iter() {
                println!(
                    "  {:>5}  tag={} plan={} reason={}   e.g. {}",
                    f.count, f.tag, f.plan, f.reason, f.example
                );
            }
        }
        if report.stale > 0 {
            println!(
                "note: {} recorded decisions differ under the current configuration already (the log is older than it)",
                report.stale
            );
        }
        for (why, count) in &report.skipped {
            println!("skipped {count}: {why}");
        }
    }
    Ok(if report.flips.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// "1 shape", "2 shapes".
fn counted(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// `scopegate suggest`: fetch the usage report, print the suggestion.
async fn suggest(admin: &str, token_id: &str, json_out: bool) -> Result<ExitCode> {
    use http_body_util::BodyExt;
    let id: String = token_id
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let uri: http::Uri = format!("http://{admin}/tokens/{id}/usage")
        .parse()
        .map_err(|e| anyhow!("--admin `{admin}` is not host:port ({e})"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| anyhow!("the admin listener at {admin} did not answer in 10 s"))?
        .map_err(|e| anyhow!("cannot reach the admin listener at {admin}: {e}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != http::StatusCode::OK {
        return Err(anyhow!(
            "{admin}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    let report: scopegate::usage::Report = serde_json::from_slice(&body)
        .map_err(|e| anyhow!("{admin} did not send a usage report ({e})"))?;
    let s = scopegate::usage::suggest(&report);
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"report": report, "suggestion": s}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let total: u64 = report.calls.iter().map(|c| c.count).sum();
    println!(
        "token {} ({}): {} in {}{}",
        report.token_id,
        report.kind,
        counted(total, "allowed call"),
        counted(report.calls.len() as u64, "shape"),
        if report.dropped > 0 {
            format!(
                " ({} more of shapes not kept)",
                counted(report.dropped, "call")
            )
        } else {
            String::new()
        }
    );
    println!("observed:");
    for c in &report.calls {
        println!(
            "  {:<6} {}  tag={} tenant={} account={}  x{}",
            c.method,
            c.route,
            c.tag,
            c.tenant.as_deref().unwrap_or("-"),
            c.account.as_deref().unwrap_or("-"),
            c.count
        );
    }
    println!("current:");
    for c in report.cubes.iter().flatten() {
        println!("  {}", serde_json::to_string(c)?);
    }
    if report.calls.is_empty() {
        println!("no allowed calls recorded: nothing to suggest (the token may be unused)");
        return Ok(ExitCode::SUCCESS);
    }
    println!("suggested:\n  {}", serde_json::to_string(&s.cube)?);
    let mut narrower = s.cube.clone();
    narrower.tags.clear();
    narrower.paths = s.paths.clone();
    println!(
        "narrower (exact routes):\n  {}",
        serde_json::to_string(&narrower)?
    );
    println!("could be removed:");
    let r = &s.removable;
    let mut any = false;
    for (axis, list) in [
        ("methods", &r.methods),
        ("tags", &r.tags),
        ("paths", &r.paths),
        ("tenants", &r.tenants),
        ("accounts", &r.accounts),
    ] {
        if !list.is_empty() {
            any = true;
            let shown: Vec<String> = list
                .iter()
                .map(|v| {
                    if v == "*" {
                        "\"*\" (all)".to_string()
                    } else {
                        v.clone()
                    }
                })
                .collect();
            println!("  {axis}: {}", shown.join(", "));
        }
    }
    if !any {
        println!("  nothing: the current cube is already the smallest");
    }
    Ok(ExitCode::SUCCESS)
}

/// A count read from `var`: `None` when unset, otherwise a whole number
/// from 1 up (spaces around it allowed). Anything else stops the command
/// with the variable named, rather than quietly taking a default the
/// operator did not ask for.
fn count_from_env(var: &str, of: &str) -> Result<Option<usize>> {
    match std::env::var(var) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("{var} is not UTF-8: expected a number of {of} (1 or more)")
        }
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => bail!("{var}={v:?}: expected a number of {of} (1 or more)"),
        },
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // A sidecar should not claim every core of its node: SCOPEGATE_WORKERS
    // caps the worker threads (default: one per core).
    let workers = count_from_env("SCOPEGATE_WORKERS", "worker threads")?;
    if workers == Some(1) {
        // One worker: the current-thread scheduler, without work-stealing
        // machinery or cross-thread wakeups. bench/load.sh measured 42.4k
        // against 37.3k req/s (multi-thread with one worker), +14%, mean of
        // four alternating runs. Reloads still build off this thread
        // (spawn_blocking).
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime");
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all().build().context("starting the async runtime")
}

/// Logs to stdout through the writer thread of `scopegate::logging` (a
/// stalled stdout costs log lines, counted, never requests). Keep the guard
/// until the end: dropping it writes out what is queued.
fn init_tracing(format: LogFormat) -> Result<scopegate::logging::Guard> {
    use tracing_subscriber::EnvFilter;
    let lines = count_from_env("SCOPEGATE_LOG_BUFFER_LINES", "lines")?
        .unwrap_or(scopegate::logging::DEFAULT_BUFFER_LINES);
    let (writer, guard) =
        scopegate::logging::stdout(lines).context("starting the log writer thread")?;
    let filter =
        EnvFilter::try_from_env("SCOPEGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if let LogFormat::Json = format {
        scopegate::logging::access_json_to(writer.clone());
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
    Ok(guard)
}

fn load(path: &Path, env: config::EnvLookup<'_>) -> Result<Snapshot> {
    config::load(path, env).map_err(|e| anyhow!("configuration is not valid:\n{e}"))
}

/// Transparent huge pages off for this process, unless the operator chose
/// with mimalloc's own `MIMALLOC_ALLOW_THP`. Before the configuration is
/// loaded, so the PAT records never sit in huge pages.
///
/// With THP on, khugepaged folds mimalloc's sparsely used 2 MiB ranges into
/// huge pages: with 100k PATs under load, RSS climbed from 49 to 72 MB in
/// ~9 MB steps while the live heap stayed at 27 MB (heaptrack). Off: 39 MB
/// after loading and 41 MB flat under the same load, at the same
/// throughput (BENCHMARKS.md, Memory).
fn huge_pages_off() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        match rustix::thread::disable_transparent_huge_pages(true) {
            Ok(()) => tracing::debug!("transparent huge pages disabled for this process"),
            Err(e) => tracing::warn!(
                error = %e,
                "could not disable transparent huge pages; resident memory may grow under load"
            ),
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed at once, and a
/// task of its own waits on them: the accept loop polls this future after
/// every accept that finds no other connection waiting, and polling the
/// two signal streams there cost about 500 instructions a connection
/// (callgrind, one connection a request); a oneshot costs a few dozen. If
/// that task is gone without a signal (the runtime is shutting down), this
/// resolves too.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let signals = wait_for_signal();
    tokio::spawn(async move {
        signals.await;
        tracing::info!("shutdown signal received; draining");
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

/// The wait for SIGTERM or SIGINT, with the handlers installed before it
/// is returned (so a signal sent as soon as the listener is up is not
/// missed, nor takes the default action of ending the process at once).
fn wait_for_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match streams {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn scheduler_name() -> &'static str {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current_thread",
        tokio::runtime::RuntimeFlavor::MultiThread => "multi_thread",
        _ => "other",
    }
}

async fn run_gateway(gw: Arc<Gateway>, listen: SocketAddr) -> Result<()> {
    let options = scopegate::server::ServeOptions::from_env().map_err(anyhow::Error::msg)?;
    let in_future_client =
        scopegate::upstream::upstream_client_from_env().map_err(anyhow::Error::msg)?;
    let backlog = scopegate::server::backlog_for(gw.current().snapshot.limits.max_connections);
    let listener = scopegate::server::bind(listen, backlog)
        .with_context(|| format!("binding listen.addr {listen}"))?;
    let admin_addr = gw.current().snapshot.admin_addr;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = admin_addr {
        let admin_listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding admin.addr {addr}"))?;
        let bound = admin_listener.local_addr()?;
        let mut rx = stop_rx.clone();
        tokio::spawn(admin::serve(admin_listener, gw.clone(), async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        tracing::info!(addr = %bound, "admin listening");
    }
    tracing::info!(
        addr = %listener.local_addr()?,
        // Which client carries bodiless requests and small whole bodies to
        // a plaintext HTTP/1.1 upstream (SCOPEGATE_UPSTREAM_CLIENT=hyper
        // switches to hyper's).
        upstream_client = if in_future_client { "in-future" } else { "hyper" },
        // Which server reads plain HTTP/1.1 requests
        // (SCOPEGATE_HTTP1_SERVER=hyper switches to hyper's alone).
        http1_server = if options.h1_fast_path { "own" } else { "hyper" },
        // What SCOPEGATE_WORKERS gave, read back from the running runtime.
        scheduler = scheduler_name(),
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "gateway listening"
    );
    let served = scopegate::server::serve_with(listener, gw, shutdown_signal(), options)
        .await
        .with_context(|| format!("watching listen.addr {listen} for connections"));
    let _ = stop_tx.send(true);
    served?;
    Ok(())
}

async fn serve(path: &Path, log_format: LogFormat) -> Result<ExitCode> {
    let _log = init_tracing(log_format)?;
    huge_pages_off();
    let snap = load(path, &config::process_env)?;
    for w in &snap.warnings {
        tracing::warn!(warning = %w, "configuration warning");
    }
    let listen = snap.listen_addr;
    let gw = Gateway::new(snap).map_err(|e| anyhow!(e))?;
    // Files are watched from here on; SIGHUP forces a reload.
    let force = scopegate::reload::spawn(
        gw.clone(),
        path.to_path_buf(),
        Arc::new(config::process_env),
    );
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                let _ = force.send(()).await;
            }
        });
    }
    run_gateway(gw, listen).await?;
    Ok(ExitCode::SUCCESS)
}

fn check(path: &Path) -> Result<ExitCode> {
    match config::load(path, &config::process_env) {
        Err(errors) => {
            eprintln!(
                "{}: not valid ({} problem{})",
                path.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            eprintln!("{errors}");
            Ok(ExitCode::FAILURE)
        }
        Ok(s) => {
            println!("{}: valid", path.display());
            println!(
                "  routes {} (tags {}), plans {}, accounts {}, tenants {}, PATs {}, JWT keys {}, mode {}",
                s.routes.len(),
                s.tags.len(),
                s.plans.len(),
                s.accounts.len(),
                s.tenants.len(),
                s.pats.len(),
                s.jwt.keys.len(),
                match s.mode {
                    config::Mode::Enforce => "enforce",
                    config::Mode::Shadow => "shadow",
                }
            );
            for f in &s.files {
                println!("  {}  sha256 {}", f.path.display(), f.sha256);
            }
            for w in &s.warnings {
                println!("warning: {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn explain(path: &Path, token: Option<&str>, method: &str, req_path: &str) -> Result<ExitCode> {
    let snap = load(path, &config::process_env)?;
    let method: http::Method = method
        .parse()
        .map_err(|_| anyhow!("`{method}` is not an HTTP method"))?;
    let raw_path = req_path.split('?').next().unwrap_or(req_path);
    let mut headers = http::HeaderMap::new();
    if let Some(t) = token {
        let v = http::HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| anyhow!("the token contains characters a header cannot carry"))?;
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let now = unix_now();
    let mut out = decide(&snap, &method, raw_path, &headers, now);
    // A JWKS URL or introspection endpoint is consulted as the proxy would.
    if let Err(first) = out.verdict
        && (snap.jwt.jwks.is_some() || snap.introspection.is_some())
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let metrics = scopegate::metrics::Metrics::new();
        let second = rt.block_on(scopegate::proxy::consult_token_sources(
            &snap, &metrics, first, &method, raw_path, &headers, now,
        ));
        if let Some(second) = second {
            out = second;
        }
    }
    let m = out.matched;
    let name = |v: Option<&str>| v.map(|s| json!(s)).unwrap_or(serde_json::Value::Null);
    let names = m.map(|m| m.names(&snap)).unwrap_or_default();
    let (tag, tenant, account, plan) = (names.tag, names.tenant, names.account, names.plan);
    let cubes: Vec<serde_json::Value> = match (&out.principal, m, MethodSet::of_method(&method)) {
        (Some(p), Some(m), Some(bit)) => p
            .cubes()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let target = Target {
                    method: bit,
                    route: m.id,
                    tag: m.route.tag.unwrap_or(u32::MAX),
                    tenant: m.tenant,
                    account: m.account,
                };
                match c.check(&target) {
                    Ok(()) => json!({"cube": i, "admits": true}),
                    Err(axis) => json!({"cube": i, "admits": false, "refused_on": format!("{axis:?}").to_lowercase()}),
                }
            })
            .collect(),
        _ => Vec::new(),
    };
    let (decision, status, reason) = match out.verdict {
        Ok(true) => ("allow", 200, None),
        Ok(false) => ("public", 200, None),
        Err(r) => ("deny", r.status().as_u16(), Some(r.as_str())),
    };
    let doc = json!({
        "decision": decision,
        "status": status,
        "reason": reason,
        "path": out.path.as_deref(),
        "route": m.map(|m| &*m.route.template),
        "tag": name(tag),
        "tenant": name(tenant),
        "account": name(account),
        "plan": name(plan),
        "token": out.principal.as_ref().map(|p| json!({
            "kind": p.kind().as_str(),
            "id": p.token_id(),
            "subject": p.subject(),
        })),
        "cubes": cubes,
        "generation_files": snap.files.iter().map(|f| json!({"path": f.path, "sha256": f.sha256})).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(if out.verdict.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn token_new(
    config_path: &Path,
    id: &str,
    name: Option<String>,
    expires: Option<String>,
    cube_json: &str,
) -> Result<ExitCode> {
    // The id rule the PAT loader applies, checked before a secret exists.
    if !scopegate::token::is_safe_identity(id) {
        bail!("--id must be 1-256 visible ASCII characters");
    }
    let cube: CubeSpec =
        serde_json::from_str(cube_json).context("--cube is not a valid cube (JSON)")?;
    if let Some(e) = &expires {
        pat::parse_rfc3339(e).map_err(|m| anyhow!("--expires: {m}"))?;
    }
    // Check the cube against the configuration when there is one, so a typo
    // is caught now rather than when the PAT file fails to load.
    if config_path.exists() {
        let snap = load(config_path, &config::process_env)?;
        cube.compile(&snap.vocabulary(), Strictness::Config)
            .map_err(|m| anyhow!("--cube: {m} (checked against {})", config_path.display()))?;
    } else {
        MethodSet::parse(&cube.methods).map_err(|m| anyhow!("--cube: {m}"))?;
    }
    let secret = pat::mint().map_err(|e| anyhow!("reading the system random source: {e}"))?;
    let record = PatRecordSpec {
        id: id.to_string(),
        name,
        sha256: hex::encode(pat::hash(&secret)),
        expires,
        disabled: false,
        cube: Some(cube),
        cubes: None,
    };
    let yaml = serde_yaml::to_string(&vec![record])?;
    println!("Secret (shown once; store it now — only its hash is kept):");
    println!("  {secret}");
    println!();
    println!("Record to paste under `tokens:` in the PAT file:");
    for line in yaml.lines() {
        println!("  {line}");
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// demo

/// Used for `dev-shared` (HS256) when SCOPEGATE_DEV_HS256 is unset. Demo only.
const DEMO_HS256_SECRET: &str = "scopegate-demo-hs256-secret-NOT-for-production";
const DEMO_ES256_KEY: &str = include_str!("../demo/es-2026-11.key.pem");
const DEMO_PATS: &str = include_str!("../demo/pats.yaml");

fn demo_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .or_else(|| (name == "SCOPEGATE_DEV_HS256").then(|| DEMO_HS256_SECRET.to_string()))
}

fn demo_jwt(snap: &Snapshot, kid: &str, claims: serde_json::Value) -> Result<String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let key = snap
        .jwt
        .keys
        .get(kid)
        .ok_or_else(|| anyhow!("gateway.yaml has no key `{kid}`"))?;
    let (alg, enc) = match key.alg {
        Algorithm::ES256 => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(DEMO_ES256_KEY.as_bytes())?,
        ),
        Algorithm::HS256 => {
            let secret = demo_env("SCOPEGATE_DEV_HS256").unwrap_or_default();
            (
                Algorithm::HS256,
                EncodingKey::from_secret(secret.as_bytes()),
            )
        }
        other => bail!("the demo cannot sign for {other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    Ok(encode(&header, &claims, &enc)?)
}

/// A stand-in for the Airbrx API: answers every request with what it saw.
async fn stand_in_api(listener: tokio::net::TcpListener) {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let seen: serde_json::Map<String, serde_json::Value> = req
                        .headers()
                        .iter()
                        .filter(|(k, _)| k.as_str().starts_with("x-airbrx-"))
                        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                        .collect();
                    let body = json!({
                        "stand_in": "airbrx-api",
                        "method": req.method().as_str(),
                        "path": req.uri().path(),
                        "identity": seen,
                    });
                    let mut resp =
                        http::Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn demo(
    config_path: &Path,
    listen: Option<SocketAddr>,
    log_format: LogFormat,
) -> Result<ExitCode> {
    // `cargo run -- demo` from the repository root finds ./gateway.yaml; from
    // elsewhere, fall back to the example shipped beside the sources.
    let path = if config_path.exists() {
        config_path.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.yaml")
    };
    let mut snap = load(&path, &demo_env)?;

    // A queue as deep as the gateway's, so that a burst of new connections
    // from a cold gateway is not dropped (tokio's default is 128).
    let api = scopegate::server::bind(([127, 0, 0, 1], 0).into(), 4096)?;
    let api_addr = api.local_addr()?;
    tokio::spawn(stand_in_api(api));
    snap.upstream.scheme = http::uri::Scheme::HTTP;
    snap.upstream.authority = http::uri::Authority::try_from(api_addr.to_string().as_str())?;

    let want = listen.unwrap_or(snap.listen_addr);
    let backlog = scopegate::server::backlog_for(snap.limits.max_connections);
    let listener = match scopegate::server::bind(want, backlog) {
        Ok(l) => l,
        Err(_) if listen.is_none() => scopegate::server::bind(([127, 0, 0, 1], 0).into(), backlog)?,
        Err(e) => return Err(e).with_context(|| format!("binding {want}")),
    };
    let addr = listener.local_addr()?;
    // The admin listener is left out of the demo so it never collides with
    // a real gateway on the same machine; `serve` runs it.
    snap.admin_addr = None;

    let now = unix_now();
    let iss = snap.jwt.issuer.clone().unwrap_or_default();
    let aud = snap.jwt.audience.clone().unwrap_or_default();
    let consultant = demo_jwt(
        &snap,
        "es-2026-11",
        json!({"iss": iss, "aud": aud, "sub": "consultant@partner.example", "jti": "jwt_consultant_demo",
               "iat": now, "exp": now + 3600,
               "cube": {"methods": ["GET"], "tags": ["analytics", "rules"],
                        "tenants": ["acme-prod", "acme-staging"], "accounts": ["acme"]}}),
    )?;
    let ci = demo_jwt(
        &snap,
        "dev-shared",
        json!({"iss": iss, "aud": aud, "sub": "ci-rules-sync", "jti": "jwt_ci_demo",
               "iat": now, "exp": now + 3600,
               "cubes": [{"methods": ["GET", "POST", "PUT"], "tags": ["rules"], "tenants": ["acme-prod"], "accounts": ["acme"]}]}),
    )?;
    let expired = demo_jwt(
        &snap,
        "es-2026-11",
        json!({"iss": iss, "aud": aud, "sub": "old", "jti": "jwt_expired_demo", "exp": now - 3600,
               "cube": {"methods": ["GET"], "tags": ["*"], "tenants": ["*"], "accounts": ["acme"]}}),
    )?;
    let pats: std::collections::BTreeMap<String, String> = serde_yaml::from_str(DEMO_PATS)?;
    let pat = |id: &str| pats.get(id).cloned().unwrap_or_default();

    let base = format!("http://{addr}");
    let lines: Vec<(&str, String)> = vec![
        (
            "allow: read-only analytics export (PAT)",
            format!(
                "curl -i -H 'Authorization: Bearer {}' {base}/v1/tenants/acme-prod/analytics/daily",
                pat("tok_analytics_export")
            ),
        ),
        (
            "allow: consultant spanning two acme tenants (ES256 JWT)",
            format!(
                "curl -i -H 'Authorization: Bearer {consultant}' {base}/v1/tenants/acme-staging/rules"
            ),
        ),
        (
            "allow: CI job writing rules (HS256 JWT)",
            format!(
                "curl -i -X POST -d '{{}}' -H 'Authorization: Bearer {ci}' {base}/v1/tenants/acme-prod/rules"
            ),
        ),
        (
            "allow: public health check, no token",
            format!("curl -i {base}/v1/health"),
        ),
        (
            "403 tenant: the export token on another tenant",
            format!(
                "curl -i -H 'Authorization: Bearer {}' {base}/v1/tenants/acme-trial/analytics/daily",
                pat("tok_analytics_export")
            ),
        ),
        (
            "403 method: the ETL token may only POST markers",
            format!(
                "curl -i -H 'Authorization: Bearer {}' {base}/v1/tenants/globex-web/markers",
                pat("tok_markers_etl")
            ),
        ),
        (
            "403 path: the consultant has no markers scope",
            format!(
                "curl -i -H 'Authorization: Bearer {consultant}' {base}/v1/tenants/acme-prod/markers"
            ),
        ),
        (
            "403 account: a globex token (every tenant of its account) on an acme tenant",
            format!(
                "curl -i -H 'Authorization: Bearer {}' {base}/v1/tenants/acme-prod/markers",
                pat("tok_globex_admin")
            ),
        ),
        (
            "403 plan: a broad token of a Free-plan account writing rules",
            format!(
                "curl -i -X POST -d '{{}}' -H 'Authorization: Bearer {}' {base}/v1/tenants/globex-web/rules",
                pat("tok_globex_admin")
            ),
        ),
        (
            "401 missing_token",
            format!("curl -i {base}/v1/tenants/acme-prod/rules"),
        ),
        (
            "401 revoked",
            format!(
                "curl -i -H 'Authorization: Bearer {}' {base}/v1/accounts/acme",
                pat("tok_old_laptop")
            ),
        ),
        (
            "401 expired",
            format!("curl -i -H 'Authorization: Bearer {expired}' {base}/v1/accounts/acme"),
        ),
        (
            "401 malformed_token",
            format!("curl -i -H 'Authorization: Bearer abx_pat_nope' {base}/v1/accounts/acme"),
        ),
        (
            "400 bad_path",
            format!("curl -i --path-as-is {base}/v1/tenants/acme-prod/../globex-web/rules"),
        ),
        (
            "404 unmapped_route",
            format!("curl -i {base}/v1/nothing-here"),
        ),
        (
            "405 method_not_allowed",
            format!("curl -i -X DELETE {base}/v1/tenants/acme-prod/markers"),
        ),
        (
            "403 unknown_tenant",
            format!(
                "curl -i -H 'Authorization: Bearer {}' {base}/v1/tenants/umbrella/analytics/daily",
                pat("tok_analytics_export")
            ),
        ),
    ];

    println!("scopegate demo");
    println!("  gateway    {base}   (config {})", path.display());
    println!("  stand-in   http://{api_addr}   (echoes the x-airbrx-* identity it receives)");
    println!();
    println!("Sample tokens (demo material only):");
    for id in [
        "tok_analytics_export",
        "tok_markers_etl",
        "tok_globex_admin",
        "tok_old_laptop",
    ] {
        println!("  PAT {id:<22} {}", pat(id));
    }
    println!("  JWT consultant (ES256)     {consultant}");
    println!("  JWT ci-rules-sync (HS256)  {ci}");
    println!();
    println!("Try these (each shows one decision):");
    for (what, line) in &lines {
        println!("# {what}");
        println!("{line}");
    }
    println!();
    println!("Ctrl-C stops the demo. Access log lines (JSON) follow.");
    println!("DEMO-READY {base}");
    let _log = init_tracing(log_format)?;

    let gw = Gateway::new(snap).map_err(|e| anyhow!(e))?;
    scopegate::serve(listener, gw, shutdown_signal())
        .await
        .context("watching the demo's listener for connections")?;
    Ok(ExitCode::SUCCESS)
}
