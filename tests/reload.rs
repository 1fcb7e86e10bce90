//! Hot reload (SPEC §8) with real files in a temp dir, changed while
//! clients send requests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_across_many_reloads() {
    let up = Upstream::start(Default::default()).await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    let _watch = gw.watch();
    let tok = markers_jwt();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, tok, addr) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            tok.clone(),
            gw.addr,
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = get(addr, "/v1/tenants/acme-prod/markers", &tok).await;
                if r.status == 200 { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let base = config_yaml(up.addr, &Options::default());
    let start_gen = gw.generation();
    for i in 1..=20u64 {
        // Each edit adds an unrelated tenant: the clients' access never changes.
        let text = base.replace(
            "  initech-eu:   { account: initech }",
            &format!("  initech-eu:   {{ account: initech }}\n  extra-{i}: {{ account: initech }}"),
        );
        write_atomic(&gw.path, &text);
        eventually(WITHIN, "generation advanced", async || {
            gw.generation() >= start_gen + i
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(
        ok.load(Ordering::Relaxed) > 40,
        "too few requests to mean anything: {}",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(
        metric(&gw.gw, "scopegate_config_generation"),
        (start_gen + 20) as f64
    );
    assert_eq!(
        metric(&gw.gw, "scopegate_config_reloads_total{result=\"failure\"}"),
        0.0
    );
    // The last edit is live.
    let all = es256(json!({"methods": ["*"], "tags": ["*"], "tenants": ["*"], "accounts": ["*"]}));
    assert_eq!(
        get(gw.addr, "/v1/tenants/extra-20/markers", &all)
            .await
            .status,
        200
    );
}

/// Wait until `token` is allowed `GET path` (a reload took effect).
async fn until_allowed(gw: &TestGateway, path: &str, token: &str, what: &str) {
    eventually(WITHIN, what, async || {
        get(gw.addr, path, token).await.status == 200
    })
    .await;
}

/// Point the link `name` in `dir` at `target` in one step, as the kubelet
/// and release tools do: a new link beside it, renamed over it.
fn swap_link(dir: &std::path::Path, name: &str, target: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::os::unix::fs::symlink(target, &tmp).expect("link");
    std::fs::rename(&tmp, dir.join(name)).expect("swap");
}

#[tokio::test]
async fn revoked_pat_is_refused_within_two_seconds() {
    let up = Upstream::start(Default::default()).await;
    let p = pat_record(
        "tok_laptop",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let gw = TestGateway::start(up.addr, &[&p], Options::default()).await;
    let _watch = gw.watch();
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/markers", &p.secret)
            .await
            .status,
        200
    );

    // An in-place edit (truncate and write), as `vi` or `echo >` would do.
    let revoked = Pat {
        secret: p.secret.clone(),
        yaml: format!("{}    disabled: true\n", p.yaml),
    };
    std::fs::write(gw.dir.path().join("tokens.yaml"), tokens_yaml(&[&revoked])).expect("write");
    let took = eventually(WITHIN, "PAT refused as revoked", async || {
        get(gw.addr, "/v1/tenants/acme-prod/markers", &p.secret)
            .await
            .reason()
            == "revoked"
    })
    .await;
    assert!(took < WITHIN);

    // A new token takes effect the same way.
    let fresh = pat_record(
        "tok_new",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    write_atomic(
        &gw.dir.path().join("tokens.yaml"),
        &tokens_yaml(&[&revoked, &fresh]),
    );
    until_allowed(
        &gw,
        "/v1/tenants/acme-prod/markers",
        &fresh.secret,
        "new PAT accepted",
    )
    .await;
}

#[tokio::test]
async fn broken_yaml_keeps_the_old_generation_and_counts_the_failure() {
    let up = Upstream::start(Default::default()).await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    let _watch = gw.watch();
    let tok = markers_jwt();
    let good = std::fs::read_to_string(&gw.path).expect("read");
    let generation = gw.generation();

    write_atomic(&gw.path, &good.replace("routes:", "routes: [oops"));
    eventually(WITHIN, "failure counted", async || {
        metric(&gw.gw, "scopegate_config_reloads_total{result=\"failure\"}") >= 1.0
    })
    .await;
    assert_eq!(gw.generation(), generation);
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/markers", &tok)
            .await
            .status,
        200
    );
    let err = gw.gw.last_error().expect("error kept for /config");
    assert!(err.contains("gateway.yaml:"), "{err}");

    // A semantically invalid edit is refused the same way, naming the key.
    write_atomic(
        &gw.path,
        &good.replace("globex: { plan: free }", "globex: { plan: gold }"),
    );
    eventually(WITHIN, "second failure counted", async || {
        metric(&gw.gw, "scopegate_config_reloads_total{result=\"failure\"}") >= 2.0
    })
    .await;
    assert!(
        gw.gw
            .last_error()
            .is_some_and(|e| e.contains("accounts.globex.plan"))
    );
    assert_eq!(gw.generation(), generation);
    assert_eq!(
        metric(&gw.gw, "scopegate_config_generation"),
        generation as f64
    );

    // Fixing it publishes the next generation.
    write_atomic(
        &gw.path,
        &good.replace("globex: { plan: free }", "globex: { plan: pro }"),
    );
    eventually(WITHIN, "recovered", async || {
        gw.generation() == generation + 1
    })
    .await;
    assert!(gw.gw.last_error().is_none());
}

#[tokio::test]
async fn a_deleted_pat_file_is_a_failed_reload_not_an_empty_store() {
    let up = Upstream::start(Default::default()).await;
    let p = pat_record(
        "tok_keep",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let gw = TestGateway::start(up.addr, &[&p], Options::default()).await;
    let _watch = gw.watch();
    std::fs::remove_file(gw.dir.path().join("tokens.yaml")).expect("rm");
    eventually(WITHIN, "failure counted", async || {
        metric(&gw.gw, "scopegate_config_reloads_total{result=\"failure\"}") >= 1.0
    })
    .await;
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/markers", &p.secret)
            .await
            .status,
        200
    );
    assert!(
        gw.gw
            .last_error()
            .is_some_and(|e| e.contains("tokens.yaml: cannot read"))
    );
}

#[tokio::test]
async fn plan_changes_and_route_edits_take_effect() {
    let up = Upstream::start(Default::default()).await;
    let broad = pat_record(
        "tok_globex",
        "{ methods: [\"*\"], tags: [\"*\"], tenants: [\"*\"], accounts: [globex] }",
        "",
    );
    let gw = TestGateway::start(up.addr, &[&broad], Options::default()).await;
    let _watch = gw.watch();
    let base = std::fs::read_to_string(&gw.path).expect("read");
    assert_eq!(
        call(
            gw.addr,
            "POST",
            "/v1/tenants/globex-web/rules",
            &broad.secret
        )
        .await
        .reason(),
        "plan"
    );

    write_atomic(
        &gw.path,
        &base.replace("globex: { plan: free }", "globex: { plan: pro }"),
    );
    eventually(WITHIN, "plan upgrade applies", async || {
        call(
            gw.addr,
            "POST",
            "/v1/tenants/globex-web/rules",
            &broad.secret,
        )
        .await
        .status
            == 200
    })
    .await;

    // A route edit: markers stop accepting POST.
    let tok = es256(
        json!({"methods": ["POST"], "tags": ["markers"], "tenants": ["acme-prod"], "accounts": ["acme"]}),
    );
    assert_eq!(
        call(gw.addr, "POST", "/v1/tenants/acme-prod/markers", &tok)
            .await
            .status,
        200
    );
    let edited = base
        .replace("globex: { plan: free }", "globex: { plan: pro }")
        .replace(
            "\"/v1/tenants/{tenant}/markers\", tag: markers, methods: [GET, POST]",
            "\"/v1/tenants/{tenant}/markers\", tag: markers, methods: [GET]",
        );
    write_atomic(&gw.path, &edited);
    eventually(WITHIN, "route edit applies", async || {
        call(gw.addr, "POST", "/v1/tenants/acme-prod/markers", &tok)
            .await
            .status
            == 405
    })
    .await;
}

#[tokio::test]
async fn requests_in_flight_finish_on_the_generation_they_started_with() {
    let up = Upstream::start(UpstreamBehaviour {
        delay: Some(Duration::from_millis(800)),
        ..Default::default()
    })
    .await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    let force = gw.watch();
    let tok = markers_jwt();
    let addr = gw.addr;
    let tok2 = tok.clone();
    let in_flight =
        tokio::spawn(async move { get(addr, "/v1/tenants/acme-prod/markers", &tok2).await });
    eventually(WITHIN, "request reached the upstream", async || {
        up.count() == 1
    })
    .await;
    // Remove the tenant while the request is at the upstream.
    let base = std::fs::read_to_string(&gw.path).expect("read");
    write_atomic(
        &gw.path,
        &base.replace("  acme-prod:    { account: acme }\n", ""),
    );
    eventually(WITHIN, "reloaded", async || gw.generation() == 2).await;
    assert_eq!(
        in_flight.await.expect("join").status,
        200,
        "the in-flight request was changed by a reload"
    );
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/markers", &tok)
            .await
            .reason(),
        "unknown_tenant"
    );
    drop(force);
}

#[tokio::test]
async fn forced_reload_publishes_even_when_nothing_changed() {
    let up = Upstream::start(Default::default()).await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    let force = gw.watch();
    force.send(()).await.expect("send");
    eventually(WITHIN, "forced generation", async || gw.generation() == 2).await;
    // A touch that changes no byte publishes nothing.
    let text = std::fs::read_to_string(&gw.path).expect("read");
    write_atomic(&gw.path, &text);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(gw.generation(), 2);
}

#[tokio::test]
async fn an_unrelated_file_in_the_folder_is_not_parsed_again() {
    use scopegate::reload::{Reloaded, Reloader, SharedEnv};
    let up = Upstream::start(Default::default()).await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    // Loading reads `secret_env` (the HS256 key): count the lookups to see
    // whether the configuration was parsed.
    let lookups = Arc::new(AtomicUsize::new(0));
    let seen = lookups.clone();
    let env: SharedEnv = Arc::new(move |name: &str| {
        seen.fetch_add(1, Ordering::SeqCst);
        test_env(name)
    });
    let reloader = Reloader::new(gw.gw.clone(), gw.path.clone(), env);

    std::fs::write(gw.dir.path().join("wrk.out"), "a log beside the config").expect("write");
    let text = std::fs::read_to_string(&gw.path).expect("read");
    write_atomic(&gw.path, &text);
    assert!(matches!(
        reloader.reload(false).await,
        Ok(Reloaded::Unchanged)
    ));
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        0,
        "parsed with no file changed"
    );
    assert_eq!(gw.generation(), 1);

    // A changed byte in any file the generation was built from is parsed
    // and published.
    let tokens = gw.dir.path().join("tokens.yaml");
    let pat = pat_record(
        "tok_new",
        r#"{methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme]}"#,
        "",
    );
    write_atomic(&tokens, &tokens_yaml(&[&pat]));
    assert!(matches!(
        reloader.reload(false).await,
        Ok(Reloaded::Published(2))
    ));
    assert!(lookups.load(Ordering::SeqCst) > 0);
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/markers", &pat.secret)
            .await
            .status,
        200
    );

    // A file that cannot be read any more goes to the full load, which
    // reports it; the generation keeps serving.
    std::fs::remove_file(&tokens).expect("rm");
    assert!(reloader.reload(false).await.is_err());
    assert_eq!(gw.generation(), 2);
}

#[cfg(unix)]
#[tokio::test]
async fn kubernetes_configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The kubelet's layout: files are links through `..data` to a
    // timestamped folder, and an update swaps `..data` atomically.
    let v1 = dir.path().join("..2026_11_22_v1");
    std::fs::create_dir(&v1).expect("mkdir");
    write_files(&v1, up.addr, &[], &Options::default());
    symlink("..2026_11_22_v1", dir.path().join("..data")).expect("link");
    for f in [
        "gateway.yaml",
        "tokens.yaml",
        "es256.pub.pem",
        "rs256.pub.pem",
        "ed25519.pub.pem",
    ] {
        symlink(format!("..data/{f}"), dir.path().join(f)).expect("link");
    }
    let path = dir.path().join("gateway.yaml");
    let gw = TestGateway::serve_from(path, dir).await;
    let _watch = gw.watch();
    let all = es256(json!({"methods": ["*"], "tags": ["*"], "tenants": ["*"], "accounts": ["*"]}));
    assert_eq!(
        get(gw.addr, "/v1/tenants/umbrella-1/markers", &all)
            .await
            .reason(),
        "unknown_tenant"
    );

    let v2 = gw.dir.path().join("..2026_11_22_v2");
    std::fs::create_dir(&v2).expect("mkdir");
    let opts = Options {
        patch: Box::new(|s| {
            s.replace(
                "  initech-eu:   { account: initech }",
                "  initech-eu:   { account: initech }\n  umbrella-1: { account: initech }",
            )
        }),
        ..Default::default()
    };
    write_files(&v2, up.addr, &[], &opts);
    swap_link(gw.dir.path(), "..data", "..2026_11_22_v2");
    until_allowed(
        &gw,
        "/v1/tenants/umbrella-1/markers",
        &all,
        "symlink swap picked up",
    )
    .await;
    assert_eq!(gw.generation(), 2);
}

#[tokio::test]
async fn a_removed_key_stops_tokens_already_verified() {
    let up = Upstream::start(Default::default()).await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    let _watch = gw.watch();
    let tok = markers_jwt();
    // Verified once, and so cached in this generation.
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/markers", &tok)
            .await
            .status,
        200
    );
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/markers", &tok)
            .await
            .status,
        200
    );
    let base = std::fs::read_to_string(&gw.path).expect("read");
    write_atomic(
        &gw.path,
        &base.replace(
            "      - { kid: es-test, alg: ES256, public_key: es256.pub.pem }\n",
            "",
        ),
    );
    eventually(
        WITHIN,
        "key removal applies to a cached token",
        async || {
            get(gw.addr, "/v1/tenants/acme-prod/markers", &tok)
                .await
                .reason()
                == "unknown_key"
        },
    )
    .await;
}

/// A reload that leaves the upstream as it was keeps its pool: the open
/// connection serves the next request. One that changes how the client is
/// built (here `connect_timeout`) builds a new pool, and one that moves the
/// upstream sends the next request to the new address, never the old.
#[tokio::test]
async fn a_reload_keeps_the_upstream_pool_unless_the_upstream_changed() {
    const MARKERS: &str = "/v1/tenants/acme-prod/markers";
    const OPENED: &str = "scopegate_upstream_connections_opened_total";
    let up = Upstream::start(Default::default()).await;
    let other = Upstream::start(Default::default()).await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    let force = gw.watch();
    let tok = markers_jwt();
    assert_eq!(get(gw.addr, MARKERS, &tok).await.status, 200);

    force.send(()).await.expect("send");
    eventually(WITHIN, "forced generation", async || gw.generation() == 2).await;
    assert_eq!(get(gw.addr, MARKERS, &tok).await.status, 200);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1, "pool kept");
    assert_eq!(metric(&gw.gw, OPENED), 1.0);

    let base = std::fs::read_to_string(&gw.path).expect("read");
    write_atomic(
        &gw.path,
        &base.replace("connect_timeout: 1s", "connect_timeout: 2s"),
    );
    eventually(WITHIN, "timeout edit", async || gw.generation() == 3).await;
    assert_eq!(get(gw.addr, MARKERS, &tok).await.status, 200);
    assert_eq!(up.connections.load(Ordering::SeqCst), 2, "a new pool");
    assert_eq!(metric(&gw.gw, OPENED), 2.0);

    write_atomic(
        &gw.path,
        &base
            .replace("connect_timeout: 1s", "connect_timeout: 2s")
            .replace(&up.addr.to_string(), &other.addr.to_string()),
    );
    eventually(WITHIN, "upstream move", async || gw.generation() == 4).await;
    let before = up.count();
    for _ in 0..3 {
        assert_eq!(get(gw.addr, MARKERS, &tok).await.status, 200);
    }
    assert_eq!(other.count(), 3, "the new upstream serves");
    assert_eq!(up.count(), before, "the old one gets nothing");
}

#[tokio::test]
async fn a_file_moved_to_another_folder_is_watched_there() {
    // After a reload the watches follow the generation's files: edits to
    // the PAT file in its new folder reload as the old one's did.
    let up = Upstream::start(Default::default()).await;
    let cube = "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }";
    let first = pat_record("tok_first", cube, "");
    let gw = TestGateway::start(up.addr, &[&first], Options::default()).await;
    let _watch = gw.watch();
    let moved = gw.dir.path().join("moved");
    std::fs::create_dir(&moved).expect("mkdir");
    write_atomic(&moved.join("tokens.yaml"), &tokens_yaml(&[&first]));
    let text = std::fs::read_to_string(&gw.path).expect("read");
    write_atomic(
        &gw.path,
        &text.replace("pat_file: tokens.yaml", "pat_file: moved/tokens.yaml"),
    );
    eventually(WITHIN, "the moved PAT file loaded", async || {
        gw.generation() == 2
    })
    .await;

    let second = pat_record("tok_second", cube, "");
    write_atomic(&moved.join("tokens.yaml"), &tokens_yaml(&[&first, &second]));
    until_allowed(
        &gw,
        "/v1/tenants/acme-prod/markers",
        &second.secret,
        "an edit in the new folder reloaded",
    )
    .await;
    assert_eq!(gw.generation(), 3);
}

#[tokio::test]
async fn a_swapped_symlinked_folder_is_watched_anew_after_a_reload() {
    // gateway.yaml's folder is itself a link (`current` -> a release
    // folder). A swap of the link happens outside every watched folder;
    // after the reload SIGHUP forces, the watch follows the link to the
    // new release, so edits there reload on their own.
    use std::os::unix::fs::symlink;
    let up = Upstream::start(Default::default()).await;
    let cube = "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }";
    let first = pat_record("tok_first", cube, "");
    let root = tempfile::tempdir().expect("tempdir");
    for release in ["v1", "v2"] {
        let d = root.path().join(release);
        std::fs::create_dir(&d).expect("mkdir");
        write_files(&d, up.addr, &[&first], &Options::default());
    }
    symlink("v1", root.path().join("current")).expect("link");
    let path = root.path().join("current").join("gateway.yaml");
    let gw = TestGateway::serve_from(path, root).await;
    let force = gw.watch();

    swap_link(gw.dir.path(), "current", "v2");
    gw.reload_now(&force).await;
    assert_eq!(gw.generation(), 2);

    let second = pat_record("tok_second", cube, "");
    write_atomic(
        &gw.dir.path().join("v2").join("tokens.yaml"),
        &tokens_yaml(&[&first, &second]),
    );
    until_allowed(
        &gw,
        "/v1/tenants/acme-prod/markers",
        &second.secret,
        "an edit in the new release reloaded",
    )
    .await;
    assert_eq!(gw.generation(), 3);
}
