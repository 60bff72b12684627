//! Sessions on the gVisor tier: the Python kernel and its protocol unchanged (carried over
//! `runsc run`'s stdio), state kept between executions, the file API on the same scratch,
//! gVisor's kernel underneath, and nothing left after close.

use ampoule_runtime::{Host, Isolation};
use ampoule_session::Session;
use ampoule_types::{ExecutionStatus, Limits};
use libtest_mimic::Failed;

use crate::cases::text_plain;
use crate::{Case, chain, check, run};

async fn state_files_and_kernel(host: Host) -> Result<(), Failed> {
    if ampoule_runtime::gvisor::find().is_none() {
        if std::env::var_os("CI").is_some() {
            return Err("runsc is not installed (scripts/deps.sh installs it)".into());
        }
        eprintln!("skipped: runsc is not installed");
        return Ok(());
    }
    let mut kernel = ampoule_session::language::find("python")
        .and_then(|k| k.locate(&Limits::default()))
        .map_err(|e| Failed::from(chain(&e)))?;
    kernel.isolation = Isolation::Gvisor;
    let t0 = std::time::Instant::now();
    let mut s = Session::start(&host, kernel, Limits::default())
        .await
        .map_err(|e| Failed::from(format!("starting on gvisor: {}", chain(&e))))?;
    let r = run(
        &mut s,
        "import os\nx = 41\nopen('/mnt/data/kept.txt', 'w').write('hello')\nos.uname().release",
    )
    .await?;
    check!(r.status == ExecutionStatus::Succeeded, r);
    check!(text_plain(&r).as_deref() == Some("'4.4.0'"), r);
    let first = t0.elapsed();
    let r = run(&mut s, "x + 1").await?;
    check!(text_plain(&r).as_deref() == Some("42"), r);
    // The figures of docs/BENCHMARKS.md's gVisor section.
    let mut trips = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        run(&mut s, "x").await?;
        trips.push(t.elapsed());
    }
    trips.sort();
    eprintln!(
        "gvisor: new session to first result {first:?}, round trip median {:?}",
        trips[10]
    );
    let data = s
        .scratch()
        .read(ampoule_runtime::scratch::DATA, "kept.txt", 1024)
        .map_err(|e| Failed::from(chain(&e)))?;
    check!(data == b"hello", String::from_utf8_lossy(&data));
    s.close().await;
    let left: Vec<_> = std::fs::read_dir(host.runtime_dir.join("gvisor"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sbx-"))
                .collect()
        })
        .unwrap_or_default();
    // Other trials may run concurrently: only this test's gvisor sandbox exists here.
    check!(left.is_empty(), left);
    Ok(())
}

pub(crate) fn cases() -> Vec<Case> {
    vec![Case::new(
        "python",
        "gvisor/state_files_and_kernel",
        state_files_and_kernel,
    )]
}
