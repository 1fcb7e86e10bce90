//! deploy/: every YAML parses, the Kubernetes example is a configuration
//! scopegate accepts, the Prometheus rules pass `promtool`, and a real
//! Prometheus server scrapes a live gateway.
//!
//! The Prometheus tests need Debian's `prometheus` package. Without it they
//! say so and return, unless SCOPEGATE_REQUIRE_PROMETHEUS is set (CI sets
//! it, and installs the package), in which case its absence fails them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

fn documents(path: &Path) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).expect("read");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

#[test]
fn every_yaml_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    assert!(files.len() >= 3, "{files:?}");
    for f in &files {
        assert!(!documents(f).is_empty(), "{} is empty", f.display());
    }
}

#[cfg(unix)]
#[test]
fn the_kubernetes_example_is_a_valid_configuration() {
    use std::os::unix::fs::symlink;
    let docs = documents(&deploy().join("kubernetes/sidecar.yaml"));
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
            .clone()
    };
    let config_map = find("ConfigMap");
    let secret = find("Secret");
    // Lay the volumes out as the kubelet does: files linked through `..data`.
    let root = tempfile::tempdir().expect("tempdir");
    for (mount, data) in [
        ("config", &config_map["data"]),
        ("secrets", &secret["stringData"]),
    ] {
        let dir = root.path().join(mount);
        let ts = dir.join("..2026_11_22_01");
        std::fs::create_dir_all(&ts).expect("mkdir");
        for (name, value) in data.as_mapping().expect("data") {
            let name = name.as_str().expect("name");
            std::fs::write(ts.join(name), value.as_str().expect("text")).expect("write");
            symlink(format!("..data/{name}"), dir.join(name)).expect("link");
        }
        symlink("..2026_11_22_01", dir.join("..data")).expect("link");
    }
    let path = root.path().join("config/gateway.yaml");
    let snap = scopegate::config::load(&path, &|_: &str| None)
        .unwrap_or_else(|e| panic!("example rejected:\n{e}"));
    assert_eq!(snap.pats.len(), 1);
    assert_eq!(snap.jwt.keys.len(), 1);
    assert!(snap.admin_addr.is_some());
    // The Deployment's args point at where the ConfigMap is mounted.
    let deployment = find("Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    let sg = containers
        .iter()
        .find(|c| c["name"] == "scopegate")
        .expect("scopegate container");
    assert_eq!(sg["args"][2], "/etc/scopegate/config/gateway.yaml");
    assert_eq!(sg["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sg["livenessProbe"]["httpGet"]["path"], "/healthz");
}

/// The path of a Prometheus tool, or None (with a note) when it is not
/// installed and not required.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("SCOPEGATE_REQUIRE_PROMETHEUS").is_none(),
            "{name} is required here but not installed (apt-get install prometheus)"
        );
        eprintln!("note: {name} not installed (apt-get install prometheus); skipping");
    }
    found
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(deploy().join("prometheus/alerts.yaml"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("6 rules found"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // `promtool check config` is not run on prometheus.yml: Debian builds
    // Prometheus without Kubernetes service discovery, so it rejects
    // `kubernetes_sd_configs` that upstream Prometheus accepts. The live
    // server test below loads the same rules file.
}

/// A free port for a child process to bind, chosen below the kernel's
/// ephemeral range. A port from `bind(0)` is in that range, so once freed
/// it could be handed to any listener another test binds to port 0 before
/// the child binds it; ports below the range are never handed out that way.
fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let below = low.saturating_sub(1024).max(1024)..low;
    for _ in 0..100 {
        let port = fastrand::u16(below.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {below:?}");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_denials_by_reason() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let up = Upstream::start(Default::default()).await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin_addr = admin.local_addr().expect("addr");
    tokio::spawn(scopegate::admin::serve(
        admin,
        gw.gw.clone(),
        std::future::pending(),
    ));

    let tok = markers_jwt();
    for _ in 0..3 {
        assert_eq!(
            get(gw.addr, "/v1/tenants/acme-staging/markers", &tok)
                .await
                .reason(),
            "tenant"
        );
    }
    for _ in 0..2 {
        assert_eq!(
            send(gw.addr, "GET", "/v1/tenants/acme-prod/markers", &[])
                .await
                .reason(),
            "missing_token"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: scopegate\n    static_configs: [{{ targets: [\"{admin_addr}\"] }}]\n",
        deploy().join("prometheus/alerts.yaml").display()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("write");
    let _server = ChildGuard::new(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let prom: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let query = format!(
        "/api/v1/query?query={}",
        urlencode("sum by (reason) (scopegate_denials_total)")
    );
    let mut last = serde_json::Value::Null;
    let ok = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(s) = tokio::net::TcpStream::connect(prom).await {
                drop(s);
                let r = send(prom, "GET", &query, &[]).await;
                last = r.json();
                let by_reason: std::collections::HashMap<String, String> = last["data"]["result"]
                    .as_array()
                    .map(|rs| {
                        rs.iter()
                            .map(|r| {
                                (
                                    r["metric"]["reason"].as_str().unwrap_or("").to_string(),
                                    r["value"][1].as_str().unwrap_or("").to_string(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if by_reason.get("tenant").map(String::as_str) == Some("3")
                    && by_reason.get("missing_token").map(String::as_str) == Some("2")
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "Prometheus never reported the denials; last answer: {last}"
    );

    // The shipped alert rules loaded into the live server.
    let rules = send(prom, "GET", "/api/v1/rules", &[]).await.json();
    let names: Vec<&str> = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        names.contains(&"ScopegateDenialSpike") && names.contains(&"ScopegateConfigReloadFailing"),
        "{rules}"
    );
}
