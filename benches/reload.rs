//! How long a whole generation takes to build at fleet scale: gateway.yaml
//! with 1,000 routes, 1,000 accounts and 10,000 tenants, and a PAT file
//! with 100,000 records — read, parsed, validated and compiled, as a reload
//! does. The baseline in the same run is the same load with a 1,000-record
//! PAT file, so the figure reads as a ratio. Dropping the built snapshot is
//! left out (`iter_with_large_drop`): a reload frees the old generation
//! later, when the last request holding it finishes, not on its own path.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};

const TAGS: usize = 50;

fn write_config(
    dir: &Path,
    routes: usize,
    accounts: usize,
    tenants: usize,
    pats: usize,
) -> PathBuf {
    let mut y = String::from(
        "listen: { addr: \"127.0.0.1:0\" }\nupstream: { url: \"http://127.0.0.1:9\" }\n",
    );
    y.push_str("tokens: { pat_file: tokens.yaml }\nplans:\n  free:\n    - { tags: [t0, t1, t2], methods: [GET] }\n  pro:\n    - { tags: [\"*\"], methods: [\"*\"] }\n");
    y.push_str("accounts:\n");
    for a in 0..accounts {
        let _ = writeln!(
            y,
            "  acct-{a}: {{ plan: {} }}",
            if a % 2 == 0 { "pro" } else { "free" }
        );
    }
    y.push_str("tenants:\n");
    for t in 0..tenants {
        let _ = writeln!(y, "  tenant-{t}: {{ account: acct-{} }}", t % accounts);
    }
    y.push_str("routes:\n");
    for r in 0..routes {
        let _ = writeln!(
            y,
            "  - {{ path: \"/v1/tenants/{{tenant}}/r{r}/{{id}}\", tag: t{}, methods: [GET, POST] }}",
            r % TAGS
        );
    }
    std::fs::write(dir.join("gateway.yaml"), y).expect("write");
    let mut p = String::with_capacity(pats * 220);
    p.push_str("tokens:\n");
    for i in 0..pats {
        // A distinct, valid-looking hash per record.
        let sha = format!(
            "{:064x}",
            (i as u128 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
        );
        let _ = writeln!(
            p,
            "  - id: tok_{i}\n    sha256: {sha}\n    cube: {{ methods: [GET], tags: [t{}], tenants: [tenant-{}], accounts: [acct-{}] }}",
            i % TAGS,
            i % tenants,
            (i % tenants) % accounts
        );
    }
    std::fs::write(dir.join("tokens.yaml"), p).expect("write");
    dir.join("gateway.yaml")
}

fn bench(c: &mut Criterion) {
    let big = tempfile::tempdir().expect("tempdir");
    let big_path = write_config(big.path(), 1_000, 1_000, 10_000, 100_000);
    let small = tempfile::tempdir().expect("tempdir");
    let small_path = write_config(small.path(), 1_000, 1_000, 10_000, 1_000);
    // The same 100k records written as JSON (valid YAML), as a provisioning
    // system would emit them.
    let json = tempfile::tempdir().expect("tempdir");
    let json_path = write_config(json.path(), 1_000, 1_000, 10_000, 0);
    let mut records = Vec::with_capacity(100_000);
    for i in 0..100_000usize {
        records.push(serde_json::json!({
            "id": format!("tok_{i}"),
            "sha256": format!("{:064x}", (i as u128 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)),
            "cube": {"methods": ["GET"], "tags": [format!("t{}", i % TAGS)], "tenants": [format!("tenant-{}", i % 10_000)], "accounts": [format!("acct-{}", (i % 10_000) % 1_000)]}
        }));
    }
    std::fs::write(
        json.path().join("tokens.yaml"),
        serde_json::json!({ "tokens": records }).to_string(),
    )
    .expect("write");
    let env = |_: &str| None;
    // Sanity: both load.
    let s = scopegate::config::load(&big_path, &env).expect("big config loads");
    assert_eq!(
        (s.routes.len(), s.tenants.len(), s.pats.len()),
        (1_000, 10_000, 100_000)
    );

    let mut g = c.benchmark_group("reload");
    g.sample_size(10);
    g.bench_function("1k routes, 10k tenants, 1k PATs (baseline)", |b| {
        b.iter_with_large_drop(|| scopegate::config::load(&small_path, &env).expect("load"))
    });
    g.bench_function("1k routes, 10k tenants, 100k PATs", |b| {
        b.iter_with_large_drop(|| scopegate::config::load(&big_path, &env).expect("load"))
    });
    g.bench_function("1k routes, 10k tenants, 100k PATs as JSON", |b| {
        b.iter_with_large_drop(|| scopegate::config::load(&json_path, &env).expect("load"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
