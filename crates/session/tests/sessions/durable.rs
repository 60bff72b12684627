//! Durable sessions: files on a disk image outlive the session and are the next one's (with
//! the disk limit still in force), the image is released when the session ends, and a frozen
//! sandbox runs nothing until it is thawed.

use std::time::Duration;

use ampoule_runtime::{EnterSpec, Host};
use ampoule_session::{Session, SessionOptions};
use ampoule_types::{ExecutionStatus, Limits};
use libtest_mimic::Failed;

use crate::cases::text_plain;
use crate::{Case, chain, check, run};

fn limits() -> Limits {
    Limits {
        disk_mib: 64,
        disk_inodes: 4096,
        ..Limits::default()
    }
}

async fn on_disk(host: &Host, image: &std::path::Path) -> Result<Session, Failed> {
    let kernel = ampoule_session::language::find("python")
        .and_then(|k| k.locate(&limits()))
        .map_err(|e| Failed::from(chain(&e)))?;
    Session::start_with(
        host,
        kernel,
        limits(),
        SessionOptions::default().with_disk(image),
    )
    .await
    .map_err(|e| Failed::from(format!("starting on a disk image: {}", chain(&e))))
}

async fn files_outlive_the_session(host: Host) -> Result<(), Failed> {
    if let Err(why) = ampoule_runtime::disk::check(host.privileged) {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = dir.path().join("disk.img");
    ampoule_runtime::disk::create(&image, limits().disk_mib, limits().disk_inodes)
        .map_err(|e| Failed::from(chain(&e)))?;
    let mut s = on_disk(&host, &image).await?;
    let r = run(
        &mut s,
        "import os, hashlib\n\
         data = os.urandom(3 << 20)\n\
         open('/mnt/data/blob', 'wb').write(data)\n\
         open('/tmp/note', 'w').write('kept')\n\
         os.makedirs('/mnt/data/sub/dir', exist_ok=True)\n\
         hashlib.sha256(data).hexdigest()",
    )
    .await?;
    check!(r.status == ExecutionStatus::Succeeded, r);
    let digest = text_plain(&r);
    // The disk limit is the image's size: a write past it fails inside.
    let r = run(
        &mut s,
        "import os\n\
         def fill():\n    try:\n        open('/mnt/data/big', 'wb').write(b'x' * (80 << 20))\n        return 'wrote'\n    except OSError as e:\n        os.remove('/mnt/data/big')\n        return e.errno\n\
         fill()",
    )
    .await?;
    check!(text_plain(&r).as_deref() == Some("28"), r);
    s.close().await;
    // Released once the sandbox is gone: no loop device keeps it.
    ampoule_runtime::disk::wait_released(&image, Duration::from_secs(10))
        .map_err(|e| Failed::from(chain(&e)))?;

    let mut s = on_disk(&host, &image).await?;
    let r = run(
        &mut s,
        "import hashlib, os\n\
         d = hashlib.sha256(open('/mnt/data/blob', 'rb').read()).hexdigest()\n\
         open('/mnt/data/blob', 'ab').write(b'more')\n\
         open('/mnt/data/sub/dir/new', 'w').write('x')\n\
         (d, open('/tmp/note').read(), os.stat('/mnt/data/blob').st_uid)",
    )
    .await?;
    check!(r.status == ExecutionStatus::Succeeded, r);
    let want = format!("({}, 'kept', 1000)", digest.as_deref().unwrap_or_default());
    check!(text_plain(&r).as_deref() == Some(want.as_str()), r);
    s.close().await;
    ampoule_runtime::disk::wait_released(&image, Duration::from_secs(10))
        .map_err(|e| Failed::from(chain(&e)))?;
    Ok(())
}

async fn a_frozen_sandbox_runs_nothing(host: Host) -> Result<(), Failed> {
    let mut s = crate::start(&host, "python", Limits::default()).await?;
    let Some(freezer) = s.freezer() else {
        eprintln!("skipped: no cgroups");
        return Ok(());
    };
    let entrance = s.entrance().ok_or_else(|| Failed::from("no entrance"))?;
    let spec = EnterSpec {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "while :; do echo x >> /mnt/data/ticks; sleep 0.01; done".into(),
        ],
        env: ampoule_session::command_env(&[]),
        cwd: "/mnt/data".into(),
        stdin: false,
    };
    let _ticker = entrance
        .spawn(&spec)
        .await
        .map_err(|e| Failed::from(chain(&e)))?;
    let size = || -> Result<u64, Failed> {
        s.scratch()
            .stat(ampoule_runtime::scratch::DATA, "ticks")
            .map(|i| i.size)
            .map_err(|e| Failed::from(e.to_string()))
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        freezer.freeze().map_err(|e| Failed::from(chain(&e)))?;
        check!(freezer.frozen(), "frozen");
        let a = size()?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let b = size()?;
        check!(a == b, format!("the ticker ran while frozen: {a} -> {b}"));
        freezer.thaw().map_err(|e| Failed::from(chain(&e)))?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let c = size()?;
        check!(c > b, format!("the ticker did not run again: {b} -> {c}"));
    }
    let r = run(&mut s, "1 + 1").await?;
    check!(text_plain(&r).as_deref() == Some("2"), r);
    s.close().await;
    Ok(())
}

/// A sandbox whose program cannot be executed reports the `exec` stage with the reason (pid 1
/// starts the program vfork-style and reports instead of `Ready`), and leaves no cgroup.
async fn a_missing_program_is_an_exec_error(host: Host) -> Result<(), Failed> {
    let cfg = ampoule_runtime::SandboxConfig::new(vec!["/nonexistent/program".into()]);
    let before = sandbox_cgroups(&host);
    let spawned = ampoule_runtime::Sandbox::spawn_with(&host, &cfg, |_| Ok(())).await;
    let err = match spawned {
        Ok(_) => return Err("a sandbox started a missing program".into()),
        Err(e) => e,
    };
    check!(
        matches!(&err, ampoule_runtime::Error::Setup { stage, message }
            if stage == "exec" && message.contains("/nonexistent/program")
                && message.contains("No such file or directory")),
        err
    );
    // Its cgroup goes with it (removal may lag the error by a moment). Other tests' sandboxes
    // may come and go meanwhile: a cgroup of ours left behind is an orphan (its slot is free),
    // which the sweep would find; live sandboxes hold their slots.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sandbox_cgroups(&host).len() > before.len() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let swept = host.sweep_orphans();
    check!(
        swept == 0,
        format!("{swept} orphaned sandbox(es) left behind")
    );
    Ok(())
}

/// The sandbox cgroups that exist now.
fn sandbox_cgroups(host: &Host) -> Vec<String> {
    host.cgroups
        .as_ref()
        .map(ampoule_runtime::cgroup::CgroupRoot::children)
        .unwrap_or_default()
}

pub(crate) fn cases() -> Vec<Case> {
    vec![
        Case::new(
            "python",
            "a_missing_program_is_an_exec_error",
            a_missing_program_is_an_exec_error,
        ),
        Case::new(
            "python",
            "durable_files_outlive_the_session",
            files_outlive_the_session,
        ),
        Case::new(
            "python",
            "durable_a_frozen_sandbox_runs_nothing",
            a_frozen_sandbox_runs_nothing,
        ),
    ]
}
