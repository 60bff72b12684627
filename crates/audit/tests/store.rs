//! The audit store's behaviour, the same suite on SQLite and PostgreSQL: what it answers for
//! each execution, tenant isolation, tamper detection, pruning.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use ampoule_audit::{
    AuditStore, EgressDecision, Filter, Kind, Record, SqlStore, Writer, sha256_hex,
};

const T0: i64 = 1_700_000_000_000;

fn execution(tenant: &str, session: &str, i: i64, status: &str, limit: Option<&str>) -> Record {
    let code = format!("print({i})");
    let mut r = Record::new(Kind::Execution, T0 + i * 1000, tenant, "python", session);
    r.execution = Some(format!("exe_{i}"));
    r.language = Some("python".into());
    r.code_sha256 = Some(sha256_hex(code.as_bytes()));
    r.code = Some(code);
    r.status = Some(status.into());
    r.duration_ms = Some(100.0 * (i + 1) as f64);
    r.cpu_time_ms = Some(50.0);
    r.peak_memory_bytes = Some(1_000_000 * (i + 1));
    r.stdout = Some(format!("{i}\n"));
    r.stderr = Some(String::new());
    r.files = vec![format!("out{i}.txt")];
    r.egress = vec![EgressDecision {
        host: "example.com".into(),
        port: 443,
        protocol: "https".into(),
        allowed: i % 2 == 0,
        reason: if i % 2 == 0 {
            "allowlisted".into()
        } else {
            "not in allowlist".into()
        },
    }];
    r.decided_by = limit.map(str::to_owned);
    if tenant == "a" && (i == 1 || i == 2) {
        // Two attempts of one agent run (the caller's context).
        r.context = Some(serde_json::json!({"run_id": "run-7", "prompt": "sum it", "step": i}));
        r.run_id = Some("run-7".into());
        r.attempt = Some(u32::try_from(i).unwrap());
    }
    r
}

/// Tenant a: one session created, four executions (succeeded, failed, timed_out, killed by
/// memory), the session killed; tenant b: one session, one execution, deleted.
fn mix() -> Vec<Record> {
    let mut v = vec![Record::new(
        Kind::SessionCreated,
        T0 - 1,
        "a",
        "python",
        "ses_a",
    )];
    v.push(execution("a", "ses_a", 0, "succeeded", None));
    v.push(execution("a", "ses_a", 1, "failed", None));
    v.push(execution("a", "ses_a", 2, "timed_out", Some("time")));
    v.push(execution("a", "ses_a", 3, "killed", Some("memory")));
    let mut killed = Record::new(Kind::SessionKilled, T0 + 3500, "a", "python", "ses_a");
    killed.duration_ms = Some(10_000.0);
    killed.decided_by = Some("memory".into());
    v.push(killed);
    v.push(Record::new(
        Kind::SessionCreated,
        T0,
        "b",
        "python",
        "ses_b",
    ));
    v.push(execution("b", "ses_b", 5, "succeeded", None));
    let mut deleted = Record::new(Kind::SessionDeleted, T0 + 6000, "b", "python", "ses_b");
    deleted.duration_ms = Some(6_000.0);
    v.push(deleted);
    v
}

fn filter(tenant: &str) -> Filter {
    Filter {
        tenant: tenant.into(),
        ..Filter::default()
    }
}

async fn answers_every_question(store: Arc<SqlStore>) {
    store.append(&mix()).await.unwrap();
    let a = store.query(&filter("a")).await.unwrap();
    assert_eq!(a.records.len(), 6);
    assert!(
        a.records.iter().all(|r| r.record.tenant == "a"),
        "tenant b leaked"
    );
    let execs: Vec<_> = a
        .records
        .iter()
        .filter(|r| r.record.kind == Kind::Execution)
        .collect();
    assert_eq!(execs.len(), 4);
    let expected = mix();
    for e in &execs {
        // Every field written is read back: time, pool, session, language, code and its hash,
        // status, duration, cpu, memory, output, files, egress, the deciding limit.
        let want = expected
            .iter()
            .find(|w| w.execution == e.record.execution)
            .unwrap();
        assert_eq!(&e.record, want);
        assert_eq!(
            e.record.code_sha256.as_deref(),
            Some(sha256_hex(want.code.as_deref().unwrap().as_bytes()).as_str())
        );
    }
    let statuses: Vec<_> = execs
        .iter()
        .map(|e| e.record.status.clone().unwrap())
        .collect();
    assert_eq!(statuses, ["succeeded", "failed", "timed_out", "killed"]);
    assert_eq!(execs[3].record.decided_by.as_deref(), Some("memory"));
    assert_eq!(execs[2].record.decided_by.as_deref(), Some("time"));

    // Filters.
    let f = Filter {
        status: Some("killed".into()),
        ..filter("a")
    };
    assert_eq!(store.query(&f).await.unwrap().records.len(), 1);
    let f = Filter {
        session: Some("ses_b".into()),
        ..filter("a")
    };
    assert!(
        store.query(&f).await.unwrap().records.is_empty(),
        "another tenant's session"
    );
    let f = Filter {
        since_ms: Some(T0 + 1000),
        until_ms: Some(T0 + 3000),
        ..filter("a")
    };
    let got: Vec<_> = store
        .query(&f)
        .await
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.record.status)
        .collect();
    assert_eq!(
        got,
        [Some("failed".to_owned()), Some("timed_out".to_owned())]
    );
    let f = Filter {
        language: Some("python".into()),
        kind: Some(Kind::Execution),
        ..filter("b")
    };
    assert_eq!(store.query(&f).await.unwrap().records.len(), 1);
    let f = Filter {
        run_id: Some("run-7".into()),
        ..filter("a")
    };
    let run: Vec<_> = store.query(&f).await.unwrap().records;
    assert_eq!(run.len(), 2);
    assert_eq!(run[1].record.attempt, Some(2));
    assert_eq!(run[0].record.context.as_ref().unwrap()["prompt"], "sum it");
    let f = Filter {
        run_id: Some("run-7".into()),
        ..filter("b")
    };
    assert!(store.query(&f).await.unwrap().records.is_empty());

    // Pagination.
    let mut f = Filter {
        limit: Some(4),
        ..filter("a")
    };
    let p1 = store.query(&f).await.unwrap();
    assert_eq!(p1.records.len(), 4);
    f.after = p1.next;
    let p2 = store.query(&f).await.unwrap();
    assert_eq!(p2.records.len(), 2);
    assert!(p2.next.is_none());

    // Usage.
    let u = store.usage("a", 0, i64::MAX).await.unwrap();
    assert_eq!(u.executions, 4);
    assert!((u.execution_seconds - 1.0).abs() < 1e-9, "{u:?}");
    assert!((u.cpu_seconds - 0.2).abs() < 1e-9, "{u:?}");
    assert!((u.session_seconds - 10.0).abs() < 1e-9, "{u:?}");
    assert_eq!(u.peak_memory_bytes, 4_000_000);
    assert_eq!(u.sessions_created, 1);
    let u = store.usage("nobody", 0, i64::MAX).await.unwrap();
    assert_eq!(u.executions, 0);

    let v = store.verify().await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.checked, 9);
}

async fn verify_detects_an_edited_record(store: Arc<SqlStore>) {
    store.append(&mix()).await.unwrap();
    assert!(store.verify().await.unwrap().ok());
    // Rewriting the hashed body.
    let n = store
        .raw_execute(
            "UPDATE audit_records SET body = REPLACE(body, 'killed', 'succeeded') WHERE seq = 5",
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let v = store.verify().await.unwrap();
    assert!(v.broken.as_deref().unwrap().contains("record 5"), "{v:?}");
}

async fn verify_detects_an_edited_column(store: Arc<SqlStore>) {
    store.append(&mix()).await.unwrap();
    store
        .raw_execute("UPDATE audit_records SET status = 'succeeded' WHERE seq = 4")
        .await
        .unwrap();
    let v = store.verify().await.unwrap();
    assert!(v.broken.as_deref().unwrap().contains("record 4"), "{v:?}");
}

async fn verify_detects_a_deleted_record(store: Arc<SqlStore>) {
    store.append(&mix()).await.unwrap();
    store
        .raw_execute("DELETE FROM audit_records WHERE seq = 3")
        .await
        .unwrap();
    let v = store.verify().await.unwrap();
    assert!(v.broken.as_deref().unwrap().contains("missing"), "{v:?}");
}

async fn verify_detects_a_deleted_last_record(store: Arc<SqlStore>) {
    store.append(&mix()).await.unwrap();
    store
        .raw_execute("DELETE FROM audit_records WHERE seq = 9")
        .await
        .unwrap();
    let v = store.verify().await.unwrap();
    assert!(v.broken.as_deref().unwrap().contains("removed"), "{v:?}");
}

async fn verify_detects_a_rewritten_chain(store: Arc<SqlStore>) {
    // Re-hashing an edited record is not enough: the next record no longer follows it.
    store.append(&mix()).await.unwrap();
    store
        .raw_execute("UPDATE audit_records SET hash = 'f00d' WHERE seq = 2")
        .await
        .unwrap();
    assert!(!store.verify().await.unwrap().ok());
}

async fn pruning_keeps_the_chain_verifiable(store: Arc<SqlStore>) {
    store.append(&mix()).await.unwrap();
    let removed = store.prune(T0 + 2000).await.unwrap();
    assert!(removed >= 3, "{removed}");
    let v = store.verify().await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.checked, 9 - removed);
    // Appending after a prune continues the chain.
    store.append(&mix()).await.unwrap();
    assert!(store.verify().await.unwrap().ok());
    // A record deleted right after the anchor is still noticed.
    let first = store.query(&filter("a")).await.unwrap().records[0].seq;
    store
        .raw_execute(&format!("DELETE FROM audit_records WHERE seq = {first}"))
        .await
        .unwrap();
    assert!(!store.verify().await.unwrap().ok());
}

/// Pool `short` keeps records 1 s, `long` 10 s, others 5 s: only the prefix whose records
/// are all past their own pool's retention goes, and the chain still verifies.
async fn retention_per_pool_removes_only_an_expired_prefix(store: Arc<SqlStore>) {
    let rec = |t: i64, pool: &str| Record::new(Kind::SessionCreated, T0 + t, "a", pool, "ses");
    store
        .append(&[
            rec(0, "short"),
            rec(100, "other"),
            rec(200, "short"),
            rec(300, "long"),
            rec(400, "short"),
        ])
        .await
        .unwrap();
    let now = T0 + 6_000;
    let per_pool = [
        ("short".to_owned(), now - 1_000),
        ("long".to_owned(), now - 10_000),
    ];
    // short (expired), other (expired at 5 s), short (expired), then long (kept): 3 go, and
    // the expired `short` record behind the kept `long` one stays.
    let removed = store.prune_retention(now - 5_000, &per_pool).await.unwrap();
    assert_eq!(removed, 3);
    let left: Vec<String> = store
        .query(&filter("a"))
        .await
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.record.pool)
        .collect();
    assert_eq!(left, ["long", "short"]);
    let v = store.verify().await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.checked, 2);
    // Nothing more is due yet; once `long` is past its retention everything goes.
    assert_eq!(
        store.prune_retention(now - 5_000, &per_pool).await.unwrap(),
        0
    );
    let later = [("long".to_owned(), T0 + 1_000)];
    assert_eq!(store.prune_retention(T0 + 1_000, &later).await.unwrap(), 2);
    assert!(store.verify().await.unwrap().ok());
    store.append(&[rec(500, "long")]).await.unwrap();
    assert!(store.verify().await.unwrap().ok());
}

async fn writer_batches_in_order(store: Arc<SqlStore>) {
    let (writer, task) = Writer::spawn(store.clone(), 64);
    for i in 0..1000 {
        writer
            .write(execution("w", "ses_w", i, "succeeded", None))
            .await
            .unwrap();
    }
    writer.flush().await.unwrap();
    let f = Filter {
        limit: Some(1000),
        ..filter("w")
    };
    let page = store.query(&f).await.unwrap();
    assert_eq!(page.records.len(), 1000);
    assert!(
        page.records
            .windows(2)
            .all(|w| w[0].record.time_ms < w[1].record.time_ms)
    );
    drop(writer);
    task.await.unwrap();
    assert!(store.verify().await.unwrap().ok());
}

/// Records with the caller's identifier and request id: found by identifier and by
/// execution (tenant-scoped), checked by `verify` like every indexed column; a record
/// without them hashes as before they existed.
async fn identifier_and_execution_are_found_and_checked(store: Arc<SqlStore>) {
    let old = Record::new(Kind::SessionCreated, T0, "a", "python", "ses_x");
    assert!(!old.body().contains("identifier"), "{}", old.body());
    assert!(!old.body().contains("request_id"), "{}", old.body());
    let mut v = mix();
    for (i, r) in v.iter_mut().enumerate().skip(1).take(2) {
        r.identifier = Some("conv-1".into());
        r.request_id = Some(format!("req-{i}"));
    }
    store.append(&v).await.unwrap();
    let page = store
        .query(&Filter {
            identifier: Some("conv-1".into()),
            ..filter("a")
        })
        .await
        .unwrap();
    let found: Vec<(Option<&str>, Option<&str>)> = page
        .records
        .iter()
        .map(|r| {
            (
                r.record.execution.as_deref(),
                r.record.request_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            (Some("exe_0"), Some("req-1")),
            (Some("exe_1"), Some("req-2"))
        ]
    );
    let page = store
        .query(&Filter {
            execution: Some("exe_2".into()),
            ..filter("a")
        })
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].record.status.as_deref(), Some("timed_out"));
    for f in [
        Filter {
            identifier: Some("conv-1".into()),
            ..filter("b")
        },
        Filter {
            execution: Some("exe_2".into()),
            ..filter("b")
        },
    ] {
        assert!(store.query(&f).await.unwrap().records.is_empty(), "{f:?}");
    }
    assert!(store.verify().await.unwrap().ok());
    // The identifier column says what the hashed body says, or verify tells.
    store
        .raw_execute("UPDATE audit_records SET identifier = 'other' WHERE seq = 2")
        .await
        .unwrap();
    let v = store.verify().await.unwrap();
    assert!(v.broken.as_deref().unwrap().contains("record 2"), "{v:?}");
}

on_both_backends!(
    identifier_and_execution_are_found_and_checked,
    answers_every_question,
    verify_detects_an_edited_record,
    verify_detects_an_edited_column,
    verify_detects_a_deleted_record,
    verify_detects_a_deleted_last_record,
    verify_detects_a_rewritten_chain,
    pruning_keeps_the_chain_verifiable,
    retention_per_pool_removes_only_an_expired_prefix,
    writer_batches_in_order,
);
