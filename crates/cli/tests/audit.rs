//! `ampoule audit`: lists a tenant's records and `verify` catches an edited and a deleted
//! record (SQLite in the config's data directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use ampoule_audit::{AuditStore, Kind, Record, SqlStore};

fn ampoule(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ampoule"))
        .arg("audit")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn lists_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!("[server]\ndata_dir = \"{}\"\n", dir.path().display()),
    )
    .unwrap();
    let store = SqlStore::sqlite(&dir.path().join("audit.db"))
        .await
        .unwrap();
    let mut records = Vec::new();
    for (i, status) in ["succeeded", "failed", "timed_out", "killed"]
        .iter()
        .enumerate()
    {
        let mut r = Record::new(Kind::Execution, 1000 + i as i64, "a", "python", "ses_1");
        r.status = Some((*status).into());
        r.duration_ms = Some(12.5);
        records.push(r);
    }
    records.push(Record::new(
        Kind::SessionCreated,
        2000,
        "b",
        "python",
        "ses_2",
    ));
    store.append(&records).await.unwrap();

    let (code, out) = ampoule(&config, &["--tenant", "a", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.lines().all(|l| l.contains("\"tenant\":\"a\"")));
    let (code, out) = ampoule(&config, &["--tenant", "a", "--status", "killed"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "header and one row: {out}");

    let (code, out) = ampoule(&config, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("5 records"), "{out}");

    store
        .raw_execute(
            "UPDATE audit_records SET body = REPLACE(body, 'failed', 'succeeded') WHERE seq = 2",
        )
        .await
        .unwrap();
    let (code, out) = ampoule(&config, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("record 2"), "{out}");

    let dir2 = tempfile::tempdir().unwrap();
    let config2 = dir2.path().join("ampoule.toml");
    std::fs::write(
        &config2,
        format!("[server]\ndata_dir = \"{}\"\n", dir2.path().display()),
    )
    .unwrap();
    let store2 = SqlStore::sqlite(&dir2.path().join("audit.db"))
        .await
        .unwrap();
    store2.append(&records).await.unwrap();
    store2
        .raw_execute("DELETE FROM audit_records WHERE seq = 3")
        .await
        .unwrap();
    let (code, out) = ampoule(&config2, &["verify"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing"), "{out}");
}

/// Retention per pool (`[pools.NAME.audit] retention_days` over `[audit]`), as the server's
/// hourly pruning applies it: the expired prefix goes and `ampoule audit verify` still passes.
#[tokio::test]
async fn verify_passes_after_retention_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ampoule.toml");
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[audit]\nretention_days = 30\n\
         [pools.short]\n[pools.short.audit]\nretention_days = 1\n[pools.python]\n",
        dir.path().display()
    );
    std::fs::write(&config, &text).unwrap();
    let cfg = ampoule_server::Config::parse(&text).unwrap();
    let store = SqlStore::sqlite(&dir.path().join("audit.db"))
        .await
        .unwrap();
    let day: i64 = 86_400_000;
    let now = std::time::SystemTime::now();
    let now_ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Two days old in `short` (past), ten days old in `python` (kept), then newer ones.
    let records = [
        (now_ms - 3 * day, "short"),
        (now_ms - 2 * day, "short"),
        (now_ms - 10 * day + 5, "python"),
        (now_ms - 2 * day + 5, "short"),
        (now_ms - 1000, "python"),
    ]
    .map(|(t, pool)| Record::new(Kind::SessionCreated, t, "a", pool, "ses"));
    store.append(&records).await.unwrap();
    let removed = ampoule_server::serve::prune_audit(&cfg, &store, now)
        .await
        .unwrap();
    assert_eq!(removed, 2, "the prefix before the kept python record");
    let (code, out) = ampoule(&config, &["verify"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 records"), "{out}");
    let (code, out) = ampoule(&config, &["--tenant", "a", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");
}
