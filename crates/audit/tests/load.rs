//! Load: 100,000 audit records written through the same channel and writer task the server
//! uses, while a stream of dummy executions runs. Shows what an execution pays for its record
//! (the time of `Writer::write`) and how fast the writer drains. Figures are printed
//! (`--nocapture`) and recorded in docs/BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ampoule_audit::{AuditStore, Filter, Kind, Record, SqlStore, Writer, sha256_hex};

const N: usize = 100_000;

/// A dummy execution: about 50 µs of work.
fn execute_dummy(i: usize) -> String {
    let started = Instant::now();
    let mut h = sha256_hex(&i.to_le_bytes());
    while started.elapsed() < Duration::from_micros(50) {
        h = sha256_hex(h.as_bytes());
    }
    h
}

fn record(i: usize, hash: String) -> Record {
    let mut r = Record::new(
        Kind::Execution,
        1_700_000_000_000 + i as i64,
        "load",
        "python",
        "ses_load",
    );
    r.language = Some("python".into());
    r.code_sha256 = Some(hash);
    r.code = Some(format!("print({i})"));
    r.status = Some("succeeded".into());
    r.duration_ms = Some(0.05);
    r.stdout = Some(format!("{i}\n"));
    r
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_records_do_not_slow_executions() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqlStore::sqlite(&dir.path().join("audit.db"))
            .await
            .unwrap(),
    );

    // Baseline: the executions alone.
    let t = Instant::now();
    for i in 0..N {
        std::hint::black_box(execute_dummy(i));
    }
    let baseline = t.elapsed();

    // The same executions, each writing its record.
    let (writer, task) = Writer::spawn(store.clone(), 16_384);
    let mut waits = Vec::with_capacity(N);
    let t = Instant::now();
    for i in 0..N {
        let h = execute_dummy(i);
        let w = Instant::now();
        writer.write(record(i, h)).await.unwrap();
        waits.push(w.elapsed());
    }
    let with_audit = t.elapsed();
    writer.flush().await.unwrap();
    let drained = t.elapsed();
    drop(writer);
    task.await.unwrap();

    let p50 = pct(&mut waits, 0.50);
    let p99 = pct(&mut waits, 0.99);
    let max = pct(&mut waits, 1.0);
    let rate = N as f64 / drained.as_secs_f64();
    let t = Instant::now();
    let v = store.verify().await.unwrap();
    let verify = t.elapsed();
    println!(
        "audit load: {N} executions; baseline {baseline:.2?}, with audit {with_audit:.2?} \
         ({:+.1}%); write() p50 {p50:.2?} p99 {p99:.2?} max {max:.2?}; all stored after \
         {drained:.2?} ({rate:.0} records/s); verify {verify:.2?}",
        (with_audit.as_secs_f64() / baseline.as_secs_f64() - 1.0) * 100.0
    );
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.checked, N as u64);
    let last = store
        .query(&Filter {
            tenant: "load".into(),
            after: Some(N as i64 - 1),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(last.records.len(), 1);
    // An execution never waits on the database: queuing its record is a channel send.
    assert!(p99 < Duration::from_millis(5), "p99 write() {p99:?}");
}
