//! The command line (SPEC §2), run as the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const DEMO_SECRET_ENV: (&str, &str) = (
    "SCOPEGATE_DEV_HS256",
    "cli-test-secret-0123456789abcdef0123",
);

fn shipped_config() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.yaml")
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env(DEMO_SECRET_ENV.0, DEMO_SECRET_ENV.1)
        .output()
        .expect("run scopegate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_example_and_names_file_and_key_on_errors() {
    let cfg = shipped_config();
    let (code, out, _) = run(&["check", "--config", cfg.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("valid") && out.contains("routes 8 (tags 6)"),
        "{out}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = std::fs::read_to_string(&cfg)
        .expect("read")
        .replace("globex:  { plan: free }", "globex:  { plan: gold }")
        .replace("pat_file: tokens.yaml", "pat_file: missing.yaml");
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, bad).expect("write");
    std::fs::create_dir(dir.path().join("keys")).expect("mkdir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("keys/es-2026-11.pub.pem"),
        dir.path().join("keys/es-2026-11.pub.pem"),
    )
    .expect("copy");
    let (code, _, err) = run(&["check", "--config", path.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("accounts.globex.plan: unknown plan `gold`"),
        "{err}"
    );
    assert!(err.contains("missing.yaml: cannot read"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");

    // A typo in a key is refused with its line.
    std::fs::write(&path, "listen: { addr: 127.0.0.1:0 }\nupstream: { url: http://127.0.0.1:1 }\nroutes: []\nmdoe: shadow\n").expect("write");
    let (code, _, err) = run(&["check", "--config", path.to_str().expect("utf8")]);
    assert_eq!(code, 1);
    assert!(err.contains("mdoe") && err.contains(":4:"), "{err}");
}

#[test]
fn explain_prints_the_decision_and_exits_by_it() {
    let cfg = shipped_config();
    let cfg = cfg.to_str().expect("utf8");
    let secrets: std::collections::BTreeMap<String, String> = serde_yaml::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/pats.yaml"))
            .expect("read"),
    )
    .expect("yaml");
    let export = &secrets["tok_analytics_export"];

    let (code, out, _) = run(&[
        "explain",
        "--config",
        cfg,
        "--token",
        export,
        "GET",
        "/v1/tenants/acme-prod/analytics/daily?x=1",
    ]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["route"], "/v1/tenants/{tenant}/analytics/{*rest}");
    assert_eq!(v["token"]["id"], "tok_analytics_export");
    assert!(!out.contains(export.as_str()), "explain echoed the token");

    let (code, out, _) = run(&[
        "explain",
        "--config",
        cfg,
        "--token",
        export,
        "GET",
        "/v1/tenants/acme-trial/analytics/daily",
    ]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (
            v["decision"].as_str(),
            v["reason"].as_str(),
            v["status"].as_u64()
        ),
        (Some("deny"), Some("tenant"), Some(403))
    );
    assert_eq!(v["cubes"][0]["refused_on"], "tenant");

    let (code, out, _) = run(&["explain", "--config", cfg, "GET", "/v1/health"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"public\""));
}

#[tokio::test]
async fn token_new_round_trips_through_a_pat_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("none.yaml");
    let cube =
        r#"{"methods":["GET"],"tags":["markers"],"tenants":["acme-prod"],"accounts":["acme"]}"#;
    let (code, out, err) = run(&[
        "token",
        "new",
        "--config",
        cfg_path.to_str().expect("utf8"),
        "--id",
        "tok_cli",
        "--name",
        "made by the cli test",
        "--expires",
        "2099-01-01T00:00:00Z",
        "--cube",
        cube,
    ]);
    assert_eq!(code, 0, "{err}");
    let secret = out
        .split_whitespace()
        .find(|w| w.starts_with(pat::PREFIX))
        .expect("a secret is printed")
        .to_string();
    assert!(pat::well_formed(&secret));
    assert_eq!(
        out.matches(&secret).count(),
        1,
        "the secret is printed exactly once"
    );
    let record: String = out
        .lines()
        .skip_while(|l| !l.contains("Record to paste"))
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(record.contains(&hex::encode(pat::hash(&secret))));

    // Paste the record into a PAT file and use the secret against a gateway.
    let up = Upstream::start(Default::default()).await;
    let pasted = Pat {
        secret: secret.clone(),
        yaml: record,
    };
    let gw = TestGateway::start(up.addr, &[&pasted], Options::default()).await;
    let r = get(gw.addr, "/v1/tenants/acme-prod/markers", &secret).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        up.last()
            .and_then(|s| s.header("x-airbrx-token-id").map(str::to_string))
            .as_deref(),
        Some("tok_cli")
    );

    // An id the PAT loader would refuse is refused before a secret exists.
    let (code, out, err) = run(&[
        "token",
        "new",
        "--config",
        cfg_path.to_str().expect("utf8"),
        "--id",
        "bad id",
        "--cube",
        cube,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--id must be"), "{err}");
    assert!(
        !out.contains(pat::PREFIX),
        "a secret was printed for a refused id"
    );

    // A cube typo is refused against the config when one is given.
    let (code, _, err) = run(&[
        "token",
        "new",
        "--config",
        shipped_config().to_str().expect("utf8"),
        "--id",
        "x",
        "--cube",
        r#"{"methods":["GET"],"tags":["analitics"]}"#,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown tag `analitics`"), "{err}");
    let (code, _, err) = run(&[
        "token",
        "new",
        "--id",
        "x",
        "--cube",
        r#"{"methods":["GET"],"tagz":[]}"#,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("tagz"), "{err}");
}

/// `scopegate demo ARGS` run in `dir` without SCOPEGATE_DEV_HS256, and
/// what it printed up to its `DEMO-READY` line (or to its end).
async fn spawn_demo(args: &[&str], dir: &Path) -> (ChildGuard, Vec<String>) {
    let mut child = Command::new(BIN)
        .arg("demo")
        .args(args)
        .current_dir(dir)
        .env_remove("SCOPEGATE_DEV_HS256")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(ChildGuard::new)
        .expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let done = line.starts_with("DEMO-READY");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    })
    .await
    .expect("join");
    (child, lines)
}

#[tokio::test]
async fn demo_serves_the_shipped_example() {
    let (child, lines) = spawn_demo(
        &["--listen", "127.0.0.1:0", "--log-format", "text"],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .await;
    let ready = lines
        .iter()
        .find(|l| l.starts_with("DEMO-READY"))
        .expect("demo became ready");
    let base = ready
        .trim_start_matches("DEMO-READY ")
        .trim_start_matches("http://");
    let addr: std::net::SocketAddr = base.parse().expect("address");

    // Replay every curl line the demo printed: each must give the status its
    // caption announces.
    let mut checked = 0;
    for pair in lines.windows(2) {
        let (caption, line) = (&pair[0], &pair[1]);
        if !caption.starts_with("# ") || !line.starts_with("curl ") {
            continue;
        }
        let expect: u16 = caption
            .split_whitespace()
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or(200);
        let token = line
            .split("Bearer ")
            .nth(1)
            .map(|r| r.split('\'').next().unwrap_or(""));
        let method = if line.contains("-X POST") {
            "POST"
        } else if line.contains("-X DELETE") {
            "DELETE"
        } else {
            "GET"
        };
        let target = line.rsplit(base).next().expect("target");
        let mut headers = Vec::new();
        let auth;
        if let Some(t) = token {
            auth = format!("Bearer {t}");
            headers.push(("authorization", auth.as_str()));
        }
        let r = send(addr, method, target, &headers).await;
        assert_eq!(
            r.status,
            expect,
            "{caption}\n{line}\n{}",
            String::from_utf8_lossy(&r.body)
        );
        checked += 1;
    }
    drop(child);
    assert!(checked >= 15, "only {checked} demo lines checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_json_access_lines_without_secrets_and_exits_0_on_sigterm() {
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pat_record(
        "tok_serve",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let with_admin = with_admin();
    let cfg = write_files(dir.path(), up.addr, &[&p], &with_admin);
    let mut log = Vec::new();
    // One worker: the current-thread runtime serves, reloads (off-thread
    // via spawn_blocking) and drains like the multi-thread one.
    let (child, rx, gw, admin) = spawn_serve_with(&cfg, &mut log, &[("SCOPEGATE_WORKERS", "1")]);
    let admin = admin.expect("admin listening");

    let jwt = markers_jwt();
    assert_eq!(
        get(gw, "/v1/tenants/acme-prod/markers", &p.secret)
            .await
            .status,
        200
    );
    let line = wait_for(&rx, &mut log, |v| v["target"] == "scopegate::access");
    for (k, want) in [
        ("method", "GET"),
        ("route", "/v1/tenants/{tenant}/markers"),
        ("tag", "markers"),
        ("tenant", "acme-prod"),
        ("account", "acme"),
        ("token_id", "tok_serve"),
        ("decision", "allow"),
    ] {
        assert_eq!(line[k], want, "{k} in {line}");
    }
    assert_eq!(line["status"], 200);
    assert!(line["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(line["time"].as_str().is_some_and(|s| s.contains('T')));
    assert!(line["duration_us"].is_u64() && line["upstream_us"].is_u64());

    let r = get(gw, "/v1/tenants/acme-staging/markers", &jwt).await;
    assert_eq!(r.status, 403);
    let line = wait_for(&rx, &mut log, |v| v["target"] == "scopegate::access");
    assert_eq!(
        (line["decision"].as_str(), line["reason"].as_str()),
        (Some("deny"), Some("tenant"))
    );

    // The admin listener answers, and /config carries no secret.
    assert_eq!(send(admin, "GET", "/healthz", &[]).await.status, 200);
    assert_eq!(send(admin, "GET", "/readyz", &[]).await.status, 200);
    assert_eq!(send(admin, "GET", "/nope", &[]).await.status, 404);
    // It only reads: HEAD as GET, any other method a 405.
    assert_eq!(send(admin, "HEAD", "/healthz", &[]).await.status, 200);
    for method in ["POST", "PUT", "DELETE"] {
        assert_eq!(
            send(admin, method, "/healthz", &[]).await.status,
            405,
            "{method}"
        );
    }
    let metrics = send(admin, "GET", "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    assert!(
        String::from_utf8_lossy(&metrics.body)
            .contains("scopegate_denials_total{reason=\"tenant\",tag=\"markers\"} 1")
    );
    let config = send(admin, "GET", "/config", &[]).await;
    assert_eq!(config.json()["counts"]["pats"], 1);
    let config_text = String::from_utf8_lossy(&config.body).into_owned();

    // SIGHUP forces a reload: the next generation is published and logged.
    assert_eq!(config.json()["generation"], 1);
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let reloaded = wait_for(&rx, &mut log, |v| v["message"] == "configuration reloaded");
    assert_eq!(reloaded["generation"], 2);
    assert_eq!(
        send(admin, "GET", "/config", &[]).await.json()["generation"],
        2
    );

    // SIGTERM: stop accepting, drain, exit 0.
    assert_eq!(terminate(child).await, Some(0));
    while let Ok(l) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
        log.push(l);
    }
    let all = log.join("\n");
    for secret in [p.secret.as_str(), jwt.as_str(), HS_SECRET] {
        assert!(!all.contains(secret), "a secret reached the log");
        assert!(!config_text.contains(secret), "a secret reached /config");
        assert!(
            !String::from_utf8_lossy(&metrics.body).contains(secret),
            "a secret reached /metrics"
        );
    }
}

/// A log collector that stops reading: before, the gateway's worker blocked
/// writing the access log to the full pipe, and every request after the
/// first ~160 hung. Now the lines queue, then drop (counted), and the
/// requests keep being answered; every line that is written is whole, and
/// written + dropped accounts for every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stdout_costs_counted_log_lines_never_requests() {
    const REQUESTS: usize = 2_000;
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pat_record(
        "tok_stall",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let cfg = write_files(dir.path(), up.addr, &[&p], &with_admin());
    let mut child = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().expect("utf8")])
        .env("SCOPEGATE_WORKERS", "1")
        .env("SCOPEGATE_LOG_BUFFER_LINES", "64")
        .env("SG_TEST_HS256", HS_SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(ChildGuard::new)
        .expect("spawn serve");
    // Read up to "gateway listening", then stop reading.
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut gw, mut admin) = (None, None);
    while gw.is_none() {
        let mut line = String::new();
        assert!(out.read_line(&mut line).expect("read") > 0, "serve exited");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let addr = || v["addr"].as_str().and_then(|a| a.parse().ok());
        match v["message"].as_str() {
            Some("admin listening") => admin = addr(),
            Some("gateway listening") => gw = addr(),
            _ => {}
        }
    }
    let (gw, admin): (std::net::SocketAddr, std::net::SocketAddr) =
        (gw.expect("gateway"), admin.expect("admin"));

    for i in 0..REQUESTS {
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            get(gw, "/v1/tenants/acme-prod/markers", &p.secret),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} not answered while stdout was not read"));
        assert_eq!(r.status, 200);
    }
    let metrics =
        String::from_utf8_lossy(&send(admin, "GET", "/metrics", &[]).await.body).into_owned();
    let dropped: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("scopegate_log_lines_dropped_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("scopegate_log_lines_dropped_total");
    assert!(
        dropped > 0 && dropped < REQUESTS,
        "{dropped} of {REQUESTS} lines dropped"
    );

    // Read again, stop the gateway, and count what was written.
    let reader = std::thread::spawn(move || {
        let mut access = 0;
        for line in out.lines() {
            let line = line.expect("read");
            let v: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: a cut line: {line}"));
            if v["target"] == "scopegate::access" {
                access += 1;
            }
        }
        access
    });
    assert_eq!(terminate(child).await, Some(0));
    let access = reader.join().expect("reader");
    assert_eq!(access + dropped, REQUESTS, "written + dropped");
}

/// `THP_enabled` of a process (Linux: 0 once PR_SET_THP_DISABLE is set).
#[cfg(target_os = "linux")]
fn thp_enabled(pid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_owned())
}

/// serve turns transparent huge pages off for itself (they grew RSS by a
/// third under load, BENCHMARKS.md) unless MIMALLOC_ALLOW_THP is set.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_turns_transparent_huge_pages_off_unless_the_operator_chose() {
    let Some(ours) = thp_enabled("self") else {
        eprintln!("this kernel does not report THP_enabled; nothing to check");
        return;
    };
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_files(dir.path(), up.addr, &[], &Default::default());
    for (env, want) in [(None, "0"), (Some("1"), ours.as_str())] {
        let mut log = Vec::new();
        let vars: Vec<(&str, &str)> = env.map(|v| ("MIMALLOC_ALLOW_THP", v)).into_iter().collect();
        let (child, _rx, _gw, _admin) = spawn_serve_with(&cfg, &mut log, &vars);
        let got = thp_enabled(&child.id().to_string());
        drop(child);
        assert_eq!(got.as_deref(), Some(want), "MIMALLOC_ALLOW_THP={env:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_slow_request_then_exits_0() {
    let up = Upstream::start(UpstreamBehaviour {
        delay: Some(std::time::Duration::from_millis(1500)),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_files(dir.path(), up.addr, &[], &Options::default());
    let mut log = Vec::new();
    let (mut child, rx, gw, _) = spawn_serve(&cfg, &mut log);
    let tok = markers_jwt();
    let slow = tokio::spawn(async move { get(gw, "/v1/tenants/acme-prod/markers", &tok).await });
    eventually(
        std::time::Duration::from_secs(5),
        "request at the upstream",
        async || up.count() == 1,
    )
    .await;

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    // The request in flight completes after SIGTERM; then the process exits 0.
    assert_eq!(slow.await.expect("join").status, 200);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
    wait_for(&rx, &mut log, |v| {
        v["message"] == "shutdown signal received; draining"
    });
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(gw).await.is_err());
}

/// `SCOPEGATE_HTTP1_SERVER` chooses the HTTP/1 server (the own loop by
/// default, hyper alone with `hyper`) and `SCOPEGATE_UPSTREAM_CLIENT` the
/// upstream client (in-future by default, or `hyper`): each choice serves,
/// the start line says which, and any other value stops `serve` with the
/// variable named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_and_client_switches_are_named_in_the_log_and_checked() {
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_files(dir.path(), up.addr, &[], &Options::default());
    let tok = markers_jwt();
    for (var, value, field, want) in [
        ("SCOPEGATE_HTTP1_SERVER", None, "http1_server", "own"),
        ("SCOPEGATE_HTTP1_SERVER", Some("own"), "http1_server", "own"),
        (
            "SCOPEGATE_HTTP1_SERVER",
            Some("hyper"),
            "http1_server",
            "hyper",
        ),
        (
            "SCOPEGATE_UPSTREAM_CLIENT",
            None,
            "upstream_client",
            "in-future",
        ),
        (
            "SCOPEGATE_UPSTREAM_CLIENT",
            Some("in-future"),
            "upstream_client",
            "in-future",
        ),
        (
            "SCOPEGATE_UPSTREAM_CLIENT",
            Some("hyper"),
            "upstream_client",
            "hyper",
        ),
    ] {
        if let Some(line) = start_line(&cfg, var, value, &tok).await {
            assert_eq!(line[field], want, "{var}={value:?}: {line}");
        }
    }
    let err = serve_refuses(&cfg, "SCOPEGATE_HTTP1_SERVER", "fast");
    assert!(
        err.contains("SCOPEGATE_HTTP1_SERVER=\"fast\""),
        "stderr: {err}"
    );
    for bad in ["Hyper", "hyper ", "raw"] {
        let err = serve_refuses(&cfg, "SCOPEGATE_UPSTREAM_CLIENT", bad);
        assert!(
            err.contains(&format!("SCOPEGATE_UPSTREAM_CLIENT={bad:?}")),
            "stderr: {err}"
        );
    }
}

/// Without `--listen`, a demo whose configured address (the shipped
/// example's 127.0.0.1:8080) is taken comes up on a free port instead; an
/// address the operator named with `--listen` is kept to, and a taken one
/// is an error naming it.
#[tokio::test]
async fn demo_falls_back_to_a_free_port_only_when_not_told_where() {
    // Held here, or already held by something else: taken either way.
    let _configured = std::net::TcpListener::bind("127.0.0.1:8080");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let (child, lines) = spawn_demo(&[], elsewhere.path()).await;
    let ready = lines
        .iter()
        .find(|l| l.starts_with("DEMO-READY"))
        .unwrap_or_else(|| panic!("demo did not start: {lines:?}"));
    let addr: std::net::SocketAddr = ready
        .trim_start_matches("DEMO-READY http://")
        .parse()
        .expect("address");
    assert_ne!(addr.port(), 8080, "{ready}");
    assert_eq!(send(addr, "GET", "/v1/health", &[]).await.status, 200);
    drop(child);

    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let want = held.local_addr().expect("addr").to_string();
    let (mut child, lines) = spawn_demo(&["--listen", &want], elsewhere.path()).await;
    assert!(
        !lines.iter().any(|l| l.starts_with("DEMO-READY")),
        "--listen {want} is taken, yet: {lines:?}"
    );
    let status = child.wait().expect("wait");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    assert!(err.contains(&format!("binding {want}")), "stderr: {err}");
}

/// `scopegate serve` with `var` set to `value` (or unset): its
/// `gateway listening` line, once a markers GET with `tok` was served.
/// `None` when `var` is to be unset but the suite itself runs with it (CI
/// runs part of it so), which the child would inherit.
async fn start_line(
    cfg: &Path,
    var: &str,
    value: Option<&str>,
    tok: &str,
) -> Option<serde_json::Value> {
    if value.is_none() && std::env::var_os(var).is_some() {
        return None;
    }
    let vars: Vec<(&str, &str)> = value.map(|v| (var, v)).into_iter().collect();
    let mut log = Vec::new();
    let (child, _rx, gw, _) = spawn_serve_with(cfg, &mut log, &vars);
    let started = log
        .iter()
        .find(|l| l.contains("gateway listening"))
        .expect("start line");
    let line = serde_json::from_str(started).expect("json line");
    assert_eq!(
        get(gw, "/v1/tenants/acme-prod/markers", tok).await.status,
        200
    );
    drop(child);
    Some(line)
}

/// `scopegate serve` with one variable set, expected to refuse to start:
/// its stderr. Stops it and fails if it is still running after 10 s.
fn serve_refuses(cfg: &Path, var: &str, value: impl AsRef<std::ffi::OsStr>) -> String {
    let value = value.as_ref();
    let mut child = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().expect("utf8")])
        .env(var, value)
        .env("SG_TEST_HS256", HS_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(ChildGuard::new)
        .expect("spawn serve");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve started with {var}={value:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(1), "{var}={value:?}: {err}");
    err
}

/// SCOPEGATE_WORKERS: the start line reads the scheduler and the worker
/// count back from the running runtime; a value that is not a whole number
/// of threads (1 or more) stops `serve` with the variable named, instead of
/// quietly taking one worker per core. SCOPEGATE_LOG_BUFFER_LINES likewise.
#[tokio::test]
async fn the_worker_count_is_read_back_in_the_log_and_checked() {
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_files(dir.path(), up.addr, &[], &Options::default());
    let tok = markers_jwt();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (value, (scheduler, workers)) in [
        // Unset: one worker per core, on the multi-thread scheduler even
        // on one core (only SCOPEGATE_WORKERS=1 picks the current-thread one).
        (None, ("multi_thread", cores)),
        (Some("1"), ("current_thread", 1)),
        (Some(" 3 "), ("multi_thread", 3)),
    ] {
        if let Some(line) = start_line(&cfg, "SCOPEGATE_WORKERS", value, &tok).await {
            assert_eq!(line["scheduler"], scheduler, "{value:?}: {line}");
            assert_eq!(line["workers"], workers, "{value:?}: {line}");
        }
    }
    for bad in ["0", "two", "", "-1", "1.5"] {
        let err = serve_refuses(&cfg, "SCOPEGATE_WORKERS", bad);
        assert!(
            err.contains(&format!("SCOPEGATE_WORKERS={bad:?}")),
            "stderr: {err}"
        );
    }
    // Not UTF-8: refused too, not taken as unset.
    use std::os::unix::ffi::OsStrExt;
    let garbled = std::ffi::OsStr::from_bytes(b"2\xff");
    for var in ["SCOPEGATE_WORKERS", "SCOPEGATE_LOG_BUFFER_LINES"] {
        let err = serve_refuses(&cfg, var, garbled);
        assert!(
            err.contains(&format!("{var} is not UTF-8")),
            "stderr: {err}"
        );
    }
    // The log queue's length is checked the same way.
    for bad in ["0", "many"] {
        let err = serve_refuses(&cfg, "SCOPEGATE_LOG_BUFFER_LINES", bad);
        assert!(
            err.contains(&format!(
                "SCOPEGATE_LOG_BUFFER_LINES={bad:?}: expected a number of lines"
            )),
            "stderr: {err}"
        );
    }
}

/// Out of file descriptors (`EMFILE`), the listener logs the failed
/// accept and backs off instead of spinning; a request left waiting in the
/// accept queue is served once descriptors are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_listener_backs_off_and_recovers() {
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_files(dir.path(), up.addr, &[], &Options::default());
    let mut log = Vec::new();
    let (child, rx, gw, _) = spawn_serve_limited(&cfg, &mut log, 64);
    // More idle connections than the gateway has descriptors for.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(gw).await.expect("connect"));
    }
    wait_for(&rx, &mut log, |v| {
        v["message"] == "accept failed"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("os error 24"))
    });
    let tok = markers_jwt();
    let waiting = tokio::spawn(async move { get(gw, "/v1/tenants/acme-prod/markers", &tok).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served while out of descriptors");
    let failed = log.iter().filter(|l| l.contains("accept failed")).count();
    drop(idle);
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("served once descriptors were free")
        .expect("join");
    assert_eq!(r.status, 200);
    assert_eq!(up.count(), 1);
    // Backing off: a few failed accepts in the 300 ms, not thousands.
    while let Ok(line) = rx.try_recv() {
        log.push(line);
    }
    let all = log.iter().filter(|l| l.contains("accept failed")).count();
    assert!(
        (1..=20).contains(&failed) && all <= failed + 20,
        "{failed} failed accepts before, {all} in all"
    );
    drop(child);
}
