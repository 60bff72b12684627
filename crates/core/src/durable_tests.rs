//! Durable sandboxes over the fake engine: pause and resume, hibernation and the way back by
//! any call that names the sandbox, a manager started again over the same store, the idle and
//! paused-time policies, the disk quota.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use crate::lifecycle::{Lifecycle, OnIdle, State, Store};
use crate::quota::Policy;
use crate::sandbox::{Command, CreateSandbox, StartProcess};
use crate::tests::manager;
use crate::{Caller, ErrorCode, ExecuteCommand, Manager, Target};

async fn durable(m: &Manager, caller: &Caller, lifecycle: Lifecycle) -> String {
    let cmd = CreateSandbox {
        metadata: BTreeMap::from([("team".into(), "red".into())]),
        lifecycle: Lifecycle {
            durable: Some(true),
            ..lifecycle
        },
        ..CreateSandbox::default()
    };
    let (info, _) = m.create_sandbox(caller, cmd).await.unwrap();
    assert!(info.durable);
    info.id
}

async fn run(m: &Manager, caller: &Caller, id: &str, code: &str) -> String {
    let r = m
        .execute(caller, ExecuteCommand::new(Target::Id(id.to_owned()), code))
        .await
        .unwrap();
    r.result.stdout
}

fn state(m: &Manager, caller: &Caller, id: &str) -> (&'static str, &'static str) {
    let i = m.get_sandbox(caller, id).unwrap();
    (i.state, i.session_state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_pauses_hibernates_and_comes_back_with_its_files() {
    let (m, stats, dir) = manager(Policy::default());
    assert_eq!(
        m.set_store(Store::open(dir.path().join("sandboxes")).unwrap()),
        0
    );
    let a = Caller::new("a");
    let id = durable(&m, &a, Lifecycle::default()).await;
    run(&m, &a, &id, "write f hello").await;

    let info = m.pause_sandbox(&a, &id).await.unwrap();
    assert_eq!(info.state, "paused");
    let paused = m.list_sandboxes(&a, &BTreeMap::new(), Some(State::Paused));
    assert_eq!(paused.len(), 1);
    // Any call naming it runs it again, memory kept.
    assert_eq!(run(&m, &a, &id, "read f").await, "hello");
    assert_eq!(state(&m, &a, &id), ("running", "kept"));

    let closed = stats.closed.load(std::sync::atomic::Ordering::SeqCst);
    let info = m.hibernate_sandbox(&a, &id).await.unwrap();
    assert_eq!((info.state, info.session_state), ("hibernated", "lost"));
    assert_eq!(
        stats.closed.load(std::sync::atomic::Ordering::SeqCst),
        closed + 1,
        "nothing of a hibernated sandbox runs"
    );
    let listed = m.list_sandboxes(&a, &BTreeMap::from([("team".into(), "red".into())]), None);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, "hibernated");
    // Another tenant sees nothing of it.
    let b = Caller::new("b");
    assert!(m.get_sandbox(&b, &id).is_err());
    assert!(
        m.execute(&b, ExecuteCommand::new(Target::Id(id.clone()), "read f"))
            .await
            .is_err()
    );
    // Its tokens still work while it sleeps.
    let tokens = m.sandbox_tokens(&a, &id).unwrap();
    assert_eq!(
        m.caller_for_token(&id, &tokens.access, false, None)
            .unwrap()
            .tenant,
        "a"
    );

    // An execution brings it back: same id, files intact, memory lost (and said so).
    assert_eq!(run(&m, &a, &id, "read f").await, "hello");
    assert_eq!(state(&m, &a, &id), ("running", "lost"));
    assert_eq!(m.sandbox_counts().running, 1);

    m.kill_sandbox(&a, &id).await.unwrap();
    assert!(m.get_sandbox(&a, &id).is_err());
    assert!(
        !dir.path().join("sandboxes").join(&id).exists(),
        "its files are deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_started_again_lists_every_durable_sandbox_as_hibernated() {
    let store = tempfile::tempdir().unwrap();
    let a = Caller::new("a");
    let mut ids = Vec::new();
    {
        let (m, _, _dir) = manager(Policy::default());
        m.set_store(Store::open(store.path()).unwrap());
        for n in 0..3 {
            let id = durable(&m, &a, Lifecycle::default()).await;
            run(&m, &a, &id, &format!("write f file{n}")).await;
            ids.push(id);
        }
        m.pause_sandbox(&a, &ids[1]).await.unwrap();
        m.hibernate_sandbox(&a, &ids[2]).await.unwrap();
        // Dropped without a shutdown: as after a crash.
    }
    let (m, _, _dir) = manager(Policy::default());
    assert_eq!(m.set_store(Store::open(store.path()).unwrap()), 3);
    let listed = m.list_sandboxes(&a, &BTreeMap::new(), None);
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|i| i.state == "hibernated"), "{listed:?}");
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(run(&m, &a, id, "read f").await, format!("file{n}"));
    }
    assert_eq!(m.sandbox_counts().hibernated, 0);
    assert_eq!(m.sandbox_counts().running, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_policies_act_on_idle_sandboxes_only() {
    let (m, _, dir) = manager(Policy::default());
    m.set_store(Store::open(dir.path().join("sandboxes")).unwrap());
    let a = Caller::new("a");
    let idle = |on_idle| Lifecycle {
        on_idle: Some(on_idle),
        idle_timeout_s: Some(1),
        ..Lifecycle::default()
    };
    let pause = durable(&m, &a, idle(OnIdle::Pause)).await;
    let busy = durable(&m, &a, idle(OnIdle::Pause)).await;
    let hibernate = durable(&m, &a, idle(OnIdle::Hibernate)).await;
    let delete = durable(&m, &a, idle(OnIdle::Delete)).await;
    let _job = m
        .start_process(
            &a,
            &busy,
            StartProcess::new(Command::Shell("sleep 30".into())),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    m.reap_once().await;
    assert_eq!(state(&m, &a, &pause).0, "paused");
    assert_eq!(
        state(&m, &a, &busy).0,
        "running",
        "a background job keeps a sandbox from idling"
    );
    assert_eq!(state(&m, &a, &hibernate).0, "hibernated");
    assert!(m.get_sandbox(&a, &delete).is_err(), "deleted when idle");

    // Paused and hibernated time: hibernate_after, then delete_after.
    let later = durable(
        &m,
        &a,
        Lifecycle {
            hibernate_after_s: Some(1),
            delete_after_s: Some(2),
            ..Lifecycle::default()
        },
    )
    .await;
    m.pause_sandbox(&a, &later).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    m.reap_once().await;
    assert_eq!(state(&m, &a, &later).0, "hibernated");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    m.reap_once().await;
    assert!(
        m.get_sandbox(&a, &later).is_err(),
        "deleted after delete_after_s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_disks_are_bounded_per_tenant_and_only_durable_ones_hibernate() {
    let (m, _, dir) = manager(Policy {
        durable_disk_mib: Some(1500),
        ..Policy::default()
    });
    m.set_store(Store::open(dir.path().join("sandboxes")).unwrap());
    let a = Caller::new("a");
    durable(&m, &a, Lifecycle::default()).await;
    let cmd = CreateSandbox {
        lifecycle: Lifecycle {
            durable: Some(true),
            ..Lifecycle::default()
        },
        ..CreateSandbox::default()
    };
    let e = m.create_sandbox(&a, cmd).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::DiskQuotaExceeded);
    let (plain, _) = m
        .create_sandbox(&a, CreateSandbox::default())
        .await
        .unwrap();
    assert!(!plain.durable);
    let e = m.hibernate_sandbox(&a, &plain.id).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict);
    // Paused in memory, it still is not durable.
    assert_eq!(
        m.pause_sandbox(&a, &plain.id).await.unwrap().state,
        "paused"
    );
    let bad = CreateSandbox {
        lifecycle: Lifecycle {
            idle_timeout_s: Some(0),
            ..Lifecycle::default()
        },
        ..CreateSandbox::default()
    };
    assert_eq!(
        m.create_sandbox(&a, bad).await.unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_commands_see_and_delete_hibernated_sessions() {
    let (m, _, dir) = manager(Policy::default());
    m.set_store(Store::open(dir.path().join("sandboxes")).unwrap());
    let a = Caller::new("a");
    let id = durable(&m, &a, Lifecycle::default()).await;
    m.hibernate_sandbox(&a, &id).await.unwrap();
    let target = Target::Id(id.clone());
    assert_eq!(m.get_session(&a, &target).unwrap().id, id);
    assert!(
        m.list_sessions(&a, None)
            .unwrap()
            .iter()
            .any(|s| s.id == id)
    );
    assert_eq!(
        m.get_sandbox(&a, &id).unwrap().state,
        "hibernated",
        "reading it does not resume it"
    );
    assert!(m.delete_session(&Caller::new("b"), &target).await.is_err());
    m.delete_session(&a, &target).await.unwrap();
    assert!(m.get_session(&a, &target).is_err());
    assert!(!dir.path().join("sandboxes").join(&id).exists());
}

/// `x + 1` in the sandbox: its text, or the error's name.
async fn x_plus_one(m: &Manager, caller: &Caller, id: &str) -> String {
    let r = m
        .execute(
            caller,
            ExecuteCommand::new(Target::Id(id.to_owned()), "x + 1"),
        )
        .await
        .unwrap()
        .result;
    match (&r.result, &r.error) {
        (Some(data), _) => data["text/plain"].as_str().unwrap_or_default().to_owned(),
        (None, Some(e)) => e.name.clone(),
        (None, None) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_checkpoints_keeps_the_memory_and_says_so_when_it_cannot() {
    use std::sync::atomic::Ordering::SeqCst;
    let (m, stats, dir) = manager(Policy::default());
    let store = dir.path().join("sandboxes");
    m.set_store(Store::open(&store).unwrap());
    stats.checkpoints.store(true, SeqCst);
    let a = Caller::new("a");
    let id = durable(&m, &a, Lifecycle::default()).await;
    run(&m, &a, &id, "x = 41; write f hello").await;
    let image = store.join(&id).join("checkpoint");

    // Checkpointed: kept while hibernated and once back; the image goes once it runs.
    let info = m.hibernate_sandbox(&a, &id).await.unwrap();
    assert_eq!((info.state, info.session_state), ("hibernated", "kept"));
    assert!(image.join("checkpoint.img").is_file());
    assert_eq!(x_plus_one(&m, &a, &id).await, "42");
    assert_eq!(state(&m, &a, &id), ("running", "kept"));
    assert!(!image.exists(), "the image outlived the restore");

    // A checkpoint that fails: files only, and the API says so.
    stats.fail_checkpoints.store(1, SeqCst);
    let info = m.hibernate_sandbox(&a, &id).await.unwrap();
    assert_eq!((info.state, info.session_state), ("hibernated", "lost"));
    assert!(!image.exists());
    assert_eq!(x_plus_one(&m, &a, &id).await, "NameError");
    assert_eq!(run(&m, &a, &id, "read f").await, "hello");
    assert_eq!(state(&m, &a, &id), ("running", "lost"));

    // A restore that fails: started with its files only, said, the image gone.
    run(&m, &a, &id, "x = 41").await;
    let info = m.hibernate_sandbox(&a, &id).await.unwrap();
    assert_eq!(info.session_state, "kept");
    stats.fail_restores.store(1, SeqCst);
    assert_eq!(x_plus_one(&m, &a, &id).await, "NameError");
    assert_eq!(state(&m, &a, &id), ("running", "lost"));
    assert_eq!(run(&m, &a, &id, "read f").await, "hello");
    assert!(!image.exists());

    // Kept across a manager started again over the same store; deleted with the sandbox.
    run(&m, &a, &id, "x = 41").await;
    m.hibernate_sandbox(&a, &id).await.unwrap();
    let (again, stats2, _dir2) = manager(Policy::default());
    stats2.checkpoints.store(true, SeqCst);
    again.set_store(Store::open(&store).unwrap());
    assert_eq!(state(&again, &a, &id), ("hibernated", "kept"));
    assert_eq!(x_plus_one(&again, &a, &id).await, "42");
    // Running when the manager shuts down: checkpointed then.
    again.shutdown().await;
    let (third, stats3, _dir3) = manager(Policy::default());
    stats3.checkpoints.store(true, SeqCst);
    third.set_store(Store::open(&store).unwrap());
    assert_eq!(state(&third, &a, &id), ("hibernated", "kept"));
    assert_eq!(x_plus_one(&third, &a, &id).await, "42");
    third.hibernate_sandbox(&a, &id).await.unwrap();
    assert!(image.join("checkpoint.img").is_file());
    third
        .delete_session(&a, &Target::Id(id.clone()))
        .await
        .unwrap();
    assert!(!store.join(&id).exists());
}
