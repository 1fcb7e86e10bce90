//! Least privilege as a product (issue 8): denials that say what was
//! needed, per-token usage and `scopegate suggest`, against the real
//! gateway and a real upstream.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn denials_teach_what_was_needed_without_revealing_more() {
    let up = Upstream::start(Default::default()).await;
    let gw = TestGateway::start(up.addr, &[], Options::default()).await;
    let tok = markers_jwt();

    // Another tenant: the token blocks; the tenant asked for is named, the
    // account owning it is not (the caller is not allowed to see it).
    let r = get(gw.addr, "/v1/tenants/globex-web/markers", &tok).await;
    assert_eq!((r.status, r.reason().as_str()), (403, "tenant"));
    let b = r.json();
    assert_eq!(b["blocked_by"], "token");
    assert_eq!(
        b["required"],
        json!({"method": "GET", "route": "/v1/tenants/{tenant}/markers", "tag": "markers", "tenant": "globex-web"})
    );

    // A method the token lacks, on its own tenant.
    let r = call(gw.addr, "POST", "/v1/tenants/acme-prod/markers", &tok).await;
    assert_eq!((r.status, r.reason().as_str()), (403, "method"));
    assert_eq!(r.json()["required"]["method"], "POST");
    assert_eq!(r.json()["required"].get("account"), None);

    // A path outside the cube.
    let r = get(gw.addr, "/v1/tenants/acme-prod/rules", &tok).await;
    assert_eq!((r.status, r.reason().as_str()), (403, "path"));
    assert_eq!(r.json()["required"]["tag"], "rules");

    // An account the path names is named back.
    let r = get(gw.addr, "/v1/accounts/initech", &tok).await;
    assert_eq!(r.reason(), "path");
    assert_eq!(r.json()["required"]["account"], "initech");

    // The plan, not the token, is the blocker: a broad token on the free plan.
    let broad =
        es256(json!({"methods": ["*"], "tags": ["*"], "tenants": ["*"], "accounts": ["globex"]}));
    let r = call(gw.addr, "POST", "/v1/tenants/globex-web/rules", &broad).await;
    assert_eq!((r.status, r.reason().as_str()), (403, "plan"));
    let b = r.json();
    assert_eq!(b["blocked_by"], "plan");
    assert_eq!(
        b["required"],
        json!({"method": "POST", "route": "/v1/tenants/{tenant}/rules", "tag": "rules", "tenant": "globex-web", "account": "globex"})
    );

    // Authentication and route denials carry no `required`, and no body
    // carries the token.
    for (r, reason) in [
        (
            get(gw.addr, "/v1/tenants/acme-prod/markers", "abx_pat_x").await,
            "malformed_token",
        ),
        (
            get(gw.addr, "/v1/tenants/nope/markers", &tok).await,
            "unknown_tenant",
        ),
        (get(gw.addr, "/v1/nowhere", &tok).await, "unmapped_route"),
    ] {
        assert_eq!(r.reason(), reason);
        assert_eq!(r.json().get("required"), None, "{reason}");
        assert_eq!(r.json().get("blocked_by"), None, "{reason}");
    }
    for (t, p) in [
        (&tok, "/v1/tenants/globex-web/markers"),
        (&broad, "/v1/tenants/globex-web/rules"),
    ] {
        let r = call(gw.addr, "POST", p, t).await;
        let body = String::from_utf8_lossy(&r.body);
        assert!(!body.contains(t.as_str()));
        assert!(!body.contains("acme-staging") && !body.contains("initech"));
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggest_after_a_scripted_workload() {
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let broad = pat_record(
        "tok_broad",
        "{ methods: [\"*\"], tags: [\"*\"], tenants: [\"*\"], accounts: [acme] }",
        "",
    );
    let unused = pat_record(
        "tok/unused~1",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let opts = with_admin();
    let cfg = write_files(dir.path(), up.addr, &[&broad, &unused], &opts);
    let mut log = Vec::new();
    let (child, _rx, gw, admin) = spawn_serve(&cfg, &mut log);
    let admin = admin.expect("admin");

    // The workload: the token may do anything on acme, but only reads
    // markers and analytics on acme-prod and posts markers there.
    for _ in 0..5 {
        assert_eq!(
            get(gw, "/v1/tenants/acme-prod/markers", &broad.secret)
                .await
                .status,
            200
        );
    }
    for _ in 0..3 {
        assert_eq!(
            call(gw, "POST", "/v1/tenants/acme-prod/markers", &broad.secret)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        get(gw, "/v1/tenants/acme-prod/analytics/daily", &broad.secret)
            .await
            .status,
        200
    );
    assert_eq!(
        call(gw, "HEAD", "/v1/tenants/acme-prod/markers", &broad.secret)
            .await
            .status,
        200
    );
    // Denied requests are not usage.
    assert_eq!(
        get(gw, "/v1/tenants/globex-web/markers", &broad.secret)
            .await
            .status,
        403
    );

    // The raw report on the admin listener.
    let r = send(admin, "GET", "/tokens/tok_broad/usage", &[]).await;
    assert_eq!(r.status, 200);
    let report = r.json();
    assert_eq!(report["kind"], "pat");
    let calls = report["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 4, "{report}");
    let get_markers = calls
        .iter()
        .find(|c| c["method"] == "GET" && c["tag"] == "markers")
        .expect("GET markers");
    assert_eq!(get_markers["count"], 5);
    assert_eq!(get_markers["tenant"], "acme-prod");
    assert_eq!(get_markers["account"], "acme");
    assert!(
        get_markers["last_seen"]
            .as_str()
            .is_some_and(|t| t.contains('T'))
    );
    assert_eq!(
        send(admin, "GET", "/tokens/nobody/usage", &[]).await.status,
        404
    );
    // Paths that only look like it, the prefix and suffix overlapping
    // among them, are not found (and the admin listener still answers).
    for path in ["/tokens/usage", "/tokens//usage", "/tokens/%+5/usage"] {
        assert_eq!(send(admin, "GET", path, &[]).await.status, 404, "{path}");
    }
    assert_eq!(send(admin, "GET", "/healthz", &[]).await.status, 200);
    // A PAT in the file that was never used: its cube, no calls (ids are
    // percent-encoded in the path).
    let r = send(admin, "GET", "/tokens/tok%2Funused~1/usage", &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["calls"], json!([]));

    // `scopegate suggest` against the running gateway.
    let suggest = |id: &str, json_out: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["suggest", "--admin", &admin.to_string(), "--token-id", id]);
        if json_out {
            cmd.arg("--json");
        }
        cmd.output().expect("suggest")
    };
    let out = suggest("tok_broad", true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let s = &v["suggestion"];
    assert_eq!(
        s["cube"],
        json!({"methods": ["GET", "POST"], "tags": ["analytics", "markers"], "tenants": ["acme-prod"], "accounts": ["acme"]})
    );
    assert_eq!(
        s["paths"],
        json!([
            "/v1/tenants/{tenant}/analytics/{*rest}",
            "/v1/tenants/{tenant}/markers"
        ])
    );
    // The current cube's wildcards are what can go.
    assert_eq!(s["removable"]["methods"], json!(["DELETE", "PATCH", "PUT"]));
    assert_eq!(s["removable"]["tags"], json!(["*"]));
    assert_eq!(s["removable"]["tenants"], json!(["*"]));
    assert_eq!(s["removable"]["accounts"], json!([]));
    assert_eq!(
        v["report"]["cubes"],
        json!([{"methods": ["GET", "POST", "PUT", "PATCH", "DELETE"], "tags": ["*"], "tenants": ["*"], "accounts": ["acme"]}])
    );

    // The text form, for people.
    let out = suggest("tok_broad", false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("10 allowed calls in 4 shapes"), "{text}");
    assert!(
        text.contains(r#"suggested:"#) && text.contains(r#""tags":["analytics","markers"]"#),
        "{text}"
    );
    assert!(text.contains("tenants: \"*\" (all)"), "{text}");
    assert!(!text.contains("nothing: the current cube"), "{text}");
    // No secret in what suggest prints or the admin serves.
    assert!(!text.contains(&broad.secret));
    let out = suggest("nobody", false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no usage recorded"));

    // A token that uses all of its cube: nothing to remove, and the text
    // says so (its id is percent-encoded on the way to the admin listener).
    assert_eq!(
        get(gw, "/v1/tenants/acme-prod/markers", &unused.secret)
            .await
            .status,
        200
    );
    let out = suggest("tok/unused~1", false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 allowed call in 1 shape\n"), "{text}");
    assert!(
        text.contains("could be removed:\n  nothing: the current cube is already the smallest"),
        "{text}"
    );
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_shows_what_a_plan_change_would_flip() {
    let up = Upstream::start(Default::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let globex = pat_record(
        "tok_globex_admin",
        "{ methods: [\"*\"], tags: [\"*\"], tenants: [\"*\"], accounts: [globex] }",
        "",
    );
    let cfg = write_files(dir.path(), up.addr, &[&globex], &Options::default());
    let mut log = Vec::new();
    let (child, rx, gw, _) = spawn_serve(&cfg, &mut log);
    let jwt = markers_jwt();
    // The recorded workload: globex (free plan) reads markers (allowed) and
    // writes rules (refused by the plan); an acme JWT reads markers; one
    // request names a tenant that does not exist; one token is malformed.
    let mut expect = Vec::new();
    for _ in 0..3 {
        expect.push(
            get(gw, "/v1/tenants/globex-web/markers", &globex.secret)
                .await
                .status,
        );
    }
    for _ in 0..2 {
        expect.push(
            call(gw, "POST", "/v1/tenants/globex-web/rules", &globex.secret)
                .await
                .status,
        );
    }
    expect.push(get(gw, "/v1/tenants/acme-prod/markers", &jwt).await.status);
    expect.push(get(gw, "/v1/tenants/acme-prod/rules", &jwt).await.status);
    expect.push(get(gw, "/v1/tenants/nope/markers", &jwt).await.status);
    expect.push(
        get(gw, "/v1/tenants/acme-prod/markers", "abx_pat_bad")
            .await
            .status,
    );
    assert_eq!(expect, [200, 200, 200, 403, 403, 200, 403, 403, 401]);
    assert_eq!(terminate(child).await, Some(0));
    while let Ok(l) = rx.recv_timeout(std::time::Duration::from_millis(300)) {
        log.push(l);
    }
    let access = dir.path().join("access.jsonl");
    std::fs::write(&access, log.join("\n")).expect("write log");

    // The candidate: globex moves to pro (rule writes allowed) and the free
    // plan loses markers — but no one else is on free, so only globex's
    // rule writes flip; and acme loses its markers via a new plan.
    let text = std::fs::read_to_string(&cfg).expect("read");
    let next = text
        .replace("  globex: { plan: free }", "  globex: { plan: pro }")
        .replace("  acme:   { plan: pro }", "  acme:   { plan: lite }")
        .replace(
            "plans:\n",
            "plans:\n  lite:\n    - { tags: [analytics], methods: [GET] }\n",
        );
    assert_ne!(text, next);
    let candidate = dir.path().join("next.yaml");
    std::fs::write(&candidate, next).expect("write candidate");

    let diff = |current: &std::path::Path, next: &std::path::Path, json_out: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("diff")
            .arg("--config")
            .arg(current)
            .arg("--candidate")
            .arg(next)
            .arg("--log")
            .arg(&access)
            .env("SG_TEST_HS256", HS_SECRET);
        if json_out {
            cmd.arg("--json");
        }
        cmd.output().expect("diff")
    };
    let out = diff(&cfg, &candidate, true);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["stale"], 0, "{report}");
    let flips = report["flips"].as_array().expect("flips");
    assert_eq!(flips.len(), 2, "{report}");
    let to_allow = flips
        .iter()
        .find(|f| f["direction"] == "deny→allow")
        .expect("deny→allow");
    assert_eq!(
        (
            &to_allow["tag"],
            &to_allow["plan"],
            &to_allow["reason"],
            &to_allow["count"]
        ),
        (&json!("rules"), &json!("pro"), &json!("plan"), &json!(2))
    );
    assert!(
        to_allow["example"]
            .as_str()
            .is_some_and(|e| e.contains("token=tok_globex_admin"))
    );
    let to_deny = flips
        .iter()
        .find(|f| f["direction"] == "allow→deny")
        .expect("allow→deny");
    assert_eq!(
        (
            &to_deny["tag"],
            &to_deny["plan"],
            &to_deny["reason"],
            &to_deny["count"]
        ),
        (&json!("markers"), &json!("lite"), &json!("plan"), &json!(1))
    );
    // 9 requests: 6 replayed; the malformed token, the JWT its cube
    // refused (its cube is not in the log) and the unknown tenant (its name
    // is not in the log) cannot be, and say so.
    assert_eq!(report["replayed"], 6, "{report}");
    assert_eq!(report["unchanged"], 3);
    assert_eq!(
        report["skipped"],
        json!({
            "authentication (token not in the log)": 1,
            "JWT refused by its cube (cube not in the log)": 1,
            "route or its tenant/account not in the log (e.g. an unknown tenant)": 1,
        })
    );

    let out = diff(&cfg, &candidate, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "replayed 6 requests: 3 would flip (1 allow→deny, 2 deny→allow), 3 unchanged"
        ),
        "{text}"
    );
    assert!(text.contains("tag=rules plan=pro reason=plan"), "{text}");
    assert!(
        !text.contains("note:"),
        "the log matches the current config: {text}"
    );

    // Swapped, the log is older than the "current" configuration: the
    // globex rule writes (logged 403) and the acme markers read (logged
    // 200) already decide otherwise under it, and the text says so.
    let swapped = diff(&candidate, &cfg, false);
    let text = String::from_utf8_lossy(&swapped.stdout);
    assert!(
        text.contains("note: 3 recorded decisions differ under the current configuration already"),
        "{text}"
    );

    // The same configuration as candidate: nothing flips, exit 0.
    let same = diff(&cfg, &cfg, false);
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );
}

#[tokio::test]
async fn roles_and_scope_strings_compile_into_cubes() {
    let up = Upstream::start(Default::default()).await;
    let viewer = pat_record(
        "tok_viewer",
        "{ role: viewer, tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let with_roles = || Options {
        patch: Box::new(|s| {
            format!(
                "{s}roles:\n  viewer: {{ methods: [GET], tags: [\"*\"] }}\n  marker-writer: {{ methods: [POST], tags: [markers] }}\n"
            )
        }),
        ..Default::default()
    };
    let gw = TestGateway::start(up.addr, &[&viewer], with_roles()).await;
    let status = |r: &Resp| (r.status, r.reason());

    // A PAT whose cube is a role.
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/rules", &viewer.secret)
            .await
            .status,
        200
    );
    let r = call(
        gw.addr,
        "POST",
        "/v1/tenants/acme-prod/markers",
        &viewer.secret,
    )
    .await;
    assert_eq!(status(&r), (403, "method".into()));

    // Scope strings, bounded by the tenants and accounts claims; words we
    // do not understand (openid, another API's read:user) grant nothing.
    let scoped = |scope: &str, extra: Value| {
        let mut c = claims(json!({"scope": scope, "tenants": ["acme-prod"], "accounts": ["acme"]}));
        for (k, v) in extra.as_object().expect("object") {
            c[k] = v.clone();
        }
        sign(jsonwebtoken::Algorithm::ES256, Some("es-test"), &c)
    };
    let t = scoped("openid analytics:read rules:write read:user", json!({}));
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/analytics/daily", &t)
            .await
            .status,
        200
    );
    assert_eq!(
        call(gw.addr, "POST", "/v1/tenants/acme-prod/rules", &t)
            .await
            .status,
        200
    );
    assert_eq!(
        call(gw.addr, "DELETE", "/v1/tenants/acme-prod/rules/r1", &t)
            .await
            .status,
        200
    );
    // GET rules: analytics:read gets further (method ok, path not) than
    // rules:write (method not), so the furthest axis is the path (SPEC §4).
    assert_eq!(
        status(&get(gw.addr, "/v1/tenants/acme-prod/rules", &t).await),
        (403, "path".into())
    );
    assert_eq!(
        status(&get(gw.addr, "/v1/tenants/acme-prod/markers", &t).await),
        (403, "path".into())
    );
    assert_eq!(
        status(&get(gw.addr, "/v1/tenants/acme-staging/analytics/x", &t).await),
        (403, "tenant".into())
    );
    // A role named in the scope.
    let t = scoped("marker-writer", json!({}));
    assert_eq!(
        call(gw.addr, "POST", "/v1/tenants/acme-prod/markers", &t)
            .await
            .status,
        200
    );
    assert_eq!(
        status(&get(gw.addr, "/v1/tenants/acme-prod/markers", &t).await),
        (403, "method".into())
    );
    // Without tenants/accounts claims a scope reaches no tenant.
    let mut c = claims(json!({"scope": "markers:*"}));
    c.as_object_mut().map(|o| o.remove("tenants"));
    let t = sign(jsonwebtoken::Algorithm::ES256, Some("es-test"), &c);
    assert_eq!(
        status(&get(gw.addr, "/v1/tenants/acme-prod/markers", &t).await),
        (403, "tenant".into())
    );
    // scope together with cube is ambiguous: malformed.
    let t = scoped("markers:read", json!({"cube": {"methods": ["GET"]}}));
    assert_eq!(
        status(&get(gw.addr, "/v1/tenants/acme-prod/markers", &t).await),
        (401, "malformed_token".into())
    );
    // An unknown role in a claim cube is malformed too.
    let t = es256(json!({"role": "superuser", "tenants": ["*"], "accounts": ["*"]}));
    assert_eq!(
        status(&get(gw.addr, "/v1/tenants/acme-prod/markers", &t).await),
        (401, "malformed_token".into())
    );

    // Configuration errors name the key.
    let dir = tempfile::tempdir().expect("tempdir");
    for (roles, key, message) in [
        (
            "  bad:name: { methods: [GET], tags: [markers] }\n",
            "roles.bad:name",
            "without `:`",
        ),
        (
            "  r: { methods: [FETCH], tags: [markers] }\n",
            "roles.r",
            "FETCH",
        ),
        (
            "  r: { methods: [GET], tags: [nosuchtag] }\n",
            "roles.r",
            "unknown tag",
        ),
        ("  r: { methods: [GET] }\n", "roles.r", "at least one of"),
    ] {
        let text = format!(
            "{}roles:\n{roles}",
            config_yaml(up.addr, &Options::default())
        );
        std::fs::write(dir.path().join("tokens.yaml"), "tokens: []\n").expect("write");
        for f in ["es256.pub.pem", "rs256.pub.pem", "ed25519.pub.pem"] {
            std::fs::copy(fixture(f), dir.path().join(f)).expect("copy");
        }
        let err = scopegate::config::from_yaml(&text, &dir.path().join("gateway.yaml"), &test_env)
            .expect_err(roles)
            .to_string();
        assert!(err.contains(key) && err.contains(message), "{roles}: {err}");
    }
    let bad_pat = pat_record(
        "tok_x",
        "{ role: nosuchrole, tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let text = format!(
        "{}roles:\n  viewer: {{ methods: [GET], tags: [\"*\"] }}\n",
        config_yaml(up.addr, &Options::default())
    );
    std::fs::write(dir.path().join("tokens.yaml"), tokens_yaml(&[&bad_pat])).expect("write");
    let err = scopegate::config::from_yaml(&text, &dir.path().join("gateway.yaml"), &test_env)
        .expect_err("unknown role in the PAT file")
        .to_string();
    assert!(err.contains("unknown role `nosuchrole`"), "{err}");
}

// ---------------------------------------------------------------------------
// Attenuated tokens

fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("b64"),
    )
    .expect("json")
}

async fn attenuate(addr: std::net::SocketAddr, bearer: &str, body: Value) -> Resp {
    send_body(
        addr,
        "POST",
        "/_scopegate/v1/tokens",
        &[
            ("authorization", &format!("Bearer {bearer}")),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await
}

#[tokio::test]
async fn attenuated_tokens_are_never_wider_than_their_parent() {
    let up = Upstream::start(Default::default()).await;
    let parent = pat_record(
        "tok_parent",
        "{ methods: [GET, POST], tags: [markers, rules], tenants: [acme-prod, acme-trial], accounts: [acme] }",
        "expires: 2099-01-01T00:00:00Z",
    );
    let soon = pat_record(
        "tok_soon",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        &format!(
            "expires: {}",
            time::OffsetDateTime::from_unix_timestamp(now() + 60)
                .expect("time")
                .format(&time::format_description::well_known::Rfc3339)
                .expect("format")
        ),
    );
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    let gw = {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("dlg.key.pem"), key.serialize_pem()).expect("write");
        std::fs::write(dir.path().join("dlg.pub.pem"), key.public_key_pem()).expect("write");
        let opts = Options {
            patch: Box::new(|s| {
                format!(
                    "{s}attenuation: {{ kid: dlg-1, alg: ES256, private_key: dlg.key.pem, public_key: dlg.pub.pem, max_ttl: 10m }}\n"
                )
            }),
            ..Default::default()
        };
        let path = write_files(dir.path(), up.addr, &[&parent, &soon], &opts);
        TestGateway::serve_from(path, dir).await
    };
    let narrow = markers_cube();

    // Issued: a short-lived JWT for exactly the requested cube.
    let r = attenuate(
        gw.addr,
        &parent.secret,
        json!({"cube": narrow, "ttl": "5m"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let issued = r.json();
    let child = issued["token"].as_str().expect("token").to_string();

    // The same request with its body written after its head: the own
    // HTTP/1 loop streams it, and the gateway's endpoint reads it in the
    // connection's own task.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = json!({"cube": narrow, "ttl": "5m"}).to_string();
        let mut s = tokio::net::TcpStream::connect(gw.addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /_scopegate/v1/tokens HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            parent.secret,
            body.len()
        );
        s.write_all(head.as_bytes()).await.expect("write");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        s.write_all(body.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 8192];
        let late = loop {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("an answer")
                .expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            if whole_answer(&got)
                && let Some(r) = parse_response(&got)
            {
                break r;
            }
        };
        assert_eq!(late.status, 201, "{}", String::from_utf8_lossy(&late.body));
    }
    let c = claims_of(&child);
    assert_eq!(c["parent"], "tok_parent");
    assert_eq!(c["cubes"], json!([narrow]));
    let ttl = c["exp"].as_i64().expect("exp") - now();
    assert!((290..=300).contains(&ttl), "ttl {ttl}");
    assert_eq!(c["iss"], ISSUER);
    assert_eq!(c["aud"], AUDIENCE);

    // It works for what it names, and nothing else.
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/markers", &child)
            .await
            .status,
        200
    );
    let seen = up.last().expect("seen");
    assert_eq!(
        seen.header("x-airbrx-token-id"),
        issued["token_id"].as_str()
    );
    assert_eq!(
        call(gw.addr, "POST", "/v1/tenants/acme-prod/markers", &child)
            .await
            .reason(),
        "method"
    );
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-prod/rules", &child)
            .await
            .reason(),
        "path"
    );
    assert_eq!(
        get(gw.addr, "/v1/tenants/acme-trial/markers", &child)
            .await
            .reason(),
        "tenant"
    );

    // Each axis that is too wide is named.
    let wider = |field: &str, value: Value| {
        let mut c = narrow.clone();
        c[field] = value;
        json!({"cube": c})
    };
    for (body, axis) in [
        (wider("methods", json!(["GET", "DELETE"])), "method"),
        (wider("tags", json!(["markers", "analytics"])), "path"),
        (wider("tags", json!(["*"])), "path"),
        (wider("paths", json!(["/v1/accounts/{account}"])), "path"),
        (
            wider("tenants", json!(["acme-prod", "acme-staging"])),
            "tenant",
        ),
        (wider("tenants", json!(["*"])), "tenant"),
        (wider("accounts", json!(["acme", "globex"])), "account"),
        (wider("accounts", json!(["*"])), "account"),
        // Inside the token, outside the plan: acme-trial is on free, which
        // does not allow writing rules.
        (
            json!({"cube": {"methods": ["POST"], "tags": ["rules"], "tenants": ["acme-trial"], "accounts": ["acme"]}}),
            "plan",
        ),
        // The same by its exact path: the plan is asked about the route's
        // tag.
        (
            json!({"cube": {"methods": ["POST"], "paths": ["/v1/tenants/{tenant}/rules"], "tenants": ["acme-trial"], "accounts": ["acme"]}}),
            "plan",
        ),
    ] {
        let r = attenuate(gw.addr, &parent.secret, body.clone()).await;
        assert_eq!(
            r.status,
            403,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["too_wide"], axis, "{body}");
        assert_eq!(r.json()["error"], "insufficient_scope", "{body}");
        assert!(
            r.json()["request_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="airbrx", error="insufficient_scope""#)
        );
    }
    // Inside both: POST markers on acme-trial is on the free plan.
    let r = attenuate(
        gw.addr,
        &parent.secret,
        json!({"cube": {"methods": ["POST"], "tags": ["markers"], "tenants": ["acme-trial"], "accounts": ["acme"]}}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // An exact path the parent covers by its route's tag.
    let r = attenuate(
        gw.addr,
        &parent.secret,
        json!({"cube": {"methods": ["GET"], "paths": ["/v1/tenants/{tenant}/markers"], "tenants": ["acme-prod"], "accounts": ["acme"]}}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    // A delegated token can be narrowed again but never widened back;
    // each answer is counted under its own result.
    let counts = || {
        (
            metric(&gw.gw, "scopegate_attenuations_total{result=\"issued\"}"),
            metric(&gw.gw, "scopegate_attenuations_total{result=\"refused\"}"),
        )
    };
    let (issued_before, refused_before) = counts();
    let again = attenuate(gw.addr, &child, json!({"cube": narrow})).await;
    assert_eq!(again.status, 201);
    assert_eq!(counts(), (issued_before + 1.0, refused_before));
    let grandchild = again.json()["token"].as_str().expect("token").to_string();
    assert_eq!(claims_of(&grandchild)["parent"], issued["token_id"]);
    assert!(claims_of(&grandchild)["exp"].as_i64() <= c["exp"].as_i64());
    let r = attenuate(gw.addr, &child, wider("methods", json!(["GET", "POST"]))).await;
    assert_eq!(
        (r.status, r.json()["too_wide"].clone()),
        (403, json!("method"))
    );
    assert_eq!(counts(), (issued_before + 1.0, refused_before + 1.0));

    // Lifetimes: max_ttl caps the request; the parent's expiry caps both.
    let r = attenuate(
        gw.addr,
        &parent.secret,
        json!({"cube": narrow, "ttl": "24h"}),
    )
    .await;
    let ttl = claims_of(r.json()["token"].as_str().expect("token"))["exp"]
        .as_i64()
        .expect("exp")
        - now();
    assert!((590..=600).contains(&ttl), "ttl {ttl}");
    let r = attenuate(gw.addr, &soon.secret, json!({"cube": narrow})).await;
    let ttl = claims_of(r.json()["token"].as_str().expect("token"))["exp"]
        .as_i64()
        .expect("exp")
        - now();
    assert!(ttl <= 60, "outlives its parent: {ttl}");

    // Bad requests and callers.
    for (bearer, body, status) in [
        ("abx_pat_nope", json!({"cube": narrow}), 401),
        (
            parent.secret.as_str(),
            json!({"cube": {"methods": ["GET"], "tags": ["markers"], "tenants": ["nope"], "accounts": ["acme"]}}),
            400,
        ),
        (
            parent.secret.as_str(),
            json!({"cube": {"methods": ["GET"], "tags": ["nosuch"]}}),
            400,
        ),
        (
            parent.secret.as_str(),
            json!({"cube": narrow, "cubes": [narrow]}),
            400,
        ),
        (
            parent.secret.as_str(),
            wider("accounts", json!(["nope"])),
            400,
        ),
        // A cube that allows nothing is a mistake, not a token.
        (parent.secret.as_str(), wider("methods", json!([])), 400),
        (
            parent.secret.as_str(),
            json!({"cube": narrow, "ttl": "soon"}),
            400,
        ),
        // Born expired.
        (
            parent.secret.as_str(),
            json!({"cube": narrow, "ttl": "0s"}),
            400,
        ),
        (
            parent.secret.as_str(),
            json!({"cube": narrow, "extra": 1}),
            400,
        ),
    ] {
        let r = attenuate(gw.addr, bearer, body.clone()).await;
        assert_eq!(
            r.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(!String::from_utf8_lossy(&r.body).contains(&parent.secret));
        // The SPEC §6 denial body: error, reason, message, request_id.
        let b = r.json();
        for field in ["error", "reason", "message", "request_id"] {
            assert!(b[field].is_string(), "{field} in {b}");
        }
        if status == 401 {
            assert_eq!(
                r.header("www-authenticate"),
                Some(r#"Bearer realm="airbrx", error="invalid_token""#)
            );
        }
        let error = if status == 401 {
            "invalid_token"
        } else {
            "invalid_request"
        };
        assert_eq!(b["error"], error, "{body}");
    }

    // The body is read up to 64 KiB, to the byte: JSON whitespace pads a
    // good request to the bound and one past it.
    let bearer = format!("Bearer {}", parent.secret);
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    for (len, status) in [(64 * 1024, 201), (64 * 1024 + 1, 413)] {
        let mut body = json!({"cube": narrow}).to_string().into_bytes();
        body.resize(len, b' ');
        let r = send_body(gw.addr, "POST", "/_scopegate/v1/tokens", &headers, &body).await;
        assert_eq!(
            r.status,
            status,
            "{len} bytes: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(metric(&gw.gw, "scopegate_attenuations_total{result=\"issued\"}") >= 5.0);
}

#[test]
fn an_attenuation_path_that_hides_a_route_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).expect("write");
    std::fs::write(dir.path().join("p.pem"), key.public_key_pem()).expect("write");
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
    std::fs::write(dir.path().join("other.pem"), other.public_key_pem()).expect("write");
    std::fs::write(dir.path().join("tokens.yaml"), "tokens: []\n").expect("write");
    for f in ["es256.pub.pem", "rs256.pub.pem", "ed25519.pub.pem"] {
        std::fs::copy(fixture(f), dir.path().join(f)).expect("copy");
    }
    let base = config_yaml("127.0.0.1:9".parse().expect("addr"), &Options::default());
    for (att, key, message) in [
        (
            "{ path: /v1/platform/status, kid: d, alg: ES256, private_key: k.pem, public_key: p.pem }",
            "attenuation.path",
            "also matched by route",
        ),
        (
            "{ kid: d, alg: ES256, private_key: k.pem, public_key: other.pem }",
            "attenuation.public_key",
            "does not match",
        ),
        (
            "{ kid: es-test, alg: ES256, private_key: k.pem, public_key: p.pem }",
            "attenuation.kid",
            "not used by tokens.jwt.keys",
        ),
        (
            "{ kid: d, alg: HS256, private_key: k.pem, public_key: p.pem }",
            "attenuation.alg",
            "ES256 or EdDSA",
        ),
    ] {
        let text = format!("{base}attenuation: {att}\n");
        let err = scopegate::config::from_yaml(&text, &dir.path().join("gateway.yaml"), &test_env)
            .expect_err(att)
            .to_string();
        assert!(err.contains(key) && err.contains(message), "{att}: {err}");
    }
}

#[tokio::test]
async fn attenuation_is_off_unless_configured() {
    let up = Upstream::start(Default::default()).await;
    let p = pat_record(
        "tok_p",
        "{ methods: [GET], tags: [markers], tenants: [acme-prod], accounts: [acme] }",
        "",
    );
    let gw = TestGateway::start(up.addr, &[&p], Options::default()).await;
    let r = attenuate(gw.addr, &p.secret, json!({"cube": {"methods": ["GET"]}})).await;
    assert_eq!((r.status, r.reason().as_str()), (404, "unmapped_route"));
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn usage_says_whether_it_is_off_or_has_nothing_for_the_token() {
    let up = Upstream::start(Default::default()).await;
    for (patch, want) in [
        ("", "no usage recorded for this token id\n"),
        ("usage: { enabled: false }\n", "usage is disabled\n"),
    ] {
        let gw = TestGateway::start(
            up.addr,
            &[],
            Options {
                patch: Box::new(move |s| format!("{s}{patch}")),
                ..Default::default()
            },
        )
        .await;
        let (status, body) = admin_get(&gw.gw, "/tokens/tok_nobody/usage").await;
        assert_eq!(
            (status, String::from_utf8_lossy(&body).as_ref()),
            (404, want),
            "{patch}"
        );
    }
}

#[tokio::test]
async fn usage_keeps_max_calls_shapes_counts_each_and_drops_the_rest() {
    let up = Upstream::start(Default::default()).await;
    let broad = pat_record(
        "tok_wide",
        "{ methods: [GET, POST], tags: [markers], tenants: [acme-prod, acme-trial], accounts: [acme] }",
        "",
    );
    let gw = TestGateway::start(
        up.addr,
        &[&broad],
        Options {
            patch: Box::new(|s| format!("{s}usage: {{ max_calls: 2 }}\n")),
            ..Default::default()
        },
    )
    .await;
    let prod = "/v1/tenants/acme-prod/markers";
    let trial = "/v1/tenants/acme-trial/markers";
    // Two shapes fit; the third (POST) does not, however often it comes.
    for (method, path) in [
        ("GET", prod),
        ("GET", trial),
        ("POST", prod),
        ("GET", prod),
        ("POST", prod),
        ("GET", trial),
        ("GET", prod),
    ] {
        assert_eq!(
            call(gw.addr, method, path, &broad.secret).await.status,
            200,
            "{method} {path}"
        );
    }
    let (status, body) = admin_get(&gw.gw, "/tokens/tok_wide/usage").await;
    assert_eq!(status, 200);
    let report: Value = serde_json::from_slice(&body).expect("json");
    let calls: Vec<(String, String, u64)> = report["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| {
            (
                c["method"].as_str().unwrap_or("").to_string(),
                c["tenant"].as_str().unwrap_or("").to_string(),
                c["count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            ("GET".to_string(), "acme-prod".to_string(), 3),
            ("GET".to_string(), "acme-trial".to_string(), 2),
        ]
    );
    assert_eq!(report["dropped"], 2);
}
