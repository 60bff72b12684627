//! The command API over the fake engine: the policy order (a refused request starts no
//! sandbox, whichever target names it), and one execution id per execution.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ampoule_types::{Language, Limits};

use crate::engine::PoolSpec;
use crate::fake::{FakeEngine, FakeStats};
use crate::quota::{Policy, Quotas};
use crate::{
    Caller, CreateSession, ErrorCode, ExecuteCommand, Manager, NoObserver, PoolSettings, Target,
    TenantLimits,
};

fn pool(name: &str, language: Language) -> PoolSettings {
    PoolSettings {
        spec: PoolSpec {
            name: name.to_owned(),
            language,
            limits: Limits::default(),
            network: None,
            zygote: None,
            warmup: String::new(),
            tenants: Vec::new(),
            max_sessions: 10,
            image: None,
            isolation: Default::default(),
        },
        warm: 0,
        max_sessions: 10,
        idle_timeout: Duration::from_secs(300),
        max_lifetime: Duration::from_secs(3600),
        max_timeout_s: 600.0,
        lifecycle: Default::default(),
        approval: Default::default(),
    }
}

/// A manager with pools `python` and `js`, tenant `a` under `policy`.
pub(crate) fn manager(policy: Policy) -> (Manager, Arc<FakeStats>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let engine = FakeEngine::new(dir.path());
    let stats = engine.stats.clone();
    let pools = BTreeMap::from([
        ("python".to_owned(), pool("python", Language::Python)),
        ("js".to_owned(), pool("js", Language::Javascript)),
    ]);
    let tenants = TenantLimits {
        quotas: Arc::new(Quotas::new(
            Policy::default(),
            HashMap::from([("a".to_owned(), policy)]),
        )),
        ..TenantLimits::default()
    };
    let m = Manager::new(
        Arc::new(engine),
        pools,
        "python".into(),
        tenants,
        Arc::new(NoObserver),
    );
    (m, stats, dir)
}

fn named(identifier: &str) -> Target {
    Target::Named {
        pool: None,
        identifier: identifier.to_owned(),
    }
}

fn conversation(identifier: &str) -> Target {
    Target::Conversation {
        identifier: Some(identifier.to_owned()),
        language: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_execution_starts_no_session_for_any_target() {
    let (m, stats, _dir) = manager(Policy {
        executions_per_minute: Some(1),
        ..Policy::default()
    });
    let a = Caller::new("a");
    let done = m
        .execute(&a, ExecuteCommand::new(named("first"), "1 + 1"))
        .await
        .unwrap();
    assert_eq!(stats.started.load(Ordering::SeqCst), 1);
    assert!(
        done.execution_id.starts_with("exe_"),
        "{}",
        done.execution_id
    );
    for target in [named("second"), conversation("third")] {
        let e = m
            .execute(&a, ExecuteCommand::new(target.clone(), "1"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::RateLimited, "{target:?}");
        assert!(e.retry_after_s().is_some());
    }
    assert_eq!(
        stats.started.load(Ordering::SeqCst),
        1,
        "a refusal started a sandbox"
    );
    assert_eq!(m.session_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_pools_languages_and_timeouts_start_no_session() {
    let (m, stats, _dir) = manager(Policy {
        pools: Some(vec!["python".into()]),
        languages: Some(vec![Language::Python]),
        max_timeout_s: Some(10.0),
        ..Policy::default()
    });
    let a = Caller::new("a");
    let js = Target::Named {
        pool: Some("js".into()),
        identifier: "x".into(),
    };
    let e = m
        .execute(&a, ExecuteCommand::new(js, "1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PoolNotAllowed);
    let by_language = Target::Conversation {
        identifier: Some("y".into()),
        language: Some("javascript".into()),
    };
    let e = m
        .execute(&a, ExecuteCommand::new(by_language, "1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PoolNotAllowed);
    let mut slow = ExecuteCommand::new(named("z"), "1");
    slow.timeout_s = Some(11.0);
    let e = m.execute(&a, slow).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::TimeoutNotAllowed);
    let e = m
        .create_session(
            &a,
            CreateSession {
                pool: Some("js".into()),
                identifier: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PoolNotAllowed);
    assert_eq!(stats.started.load(Ordering::SeqCst), 0);
    assert_eq!(m.session_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_refusal_takes_no_place_in_the_rate_window() {
    let (m, _stats, _dir) = manager(Policy {
        executions_per_minute: Some(1),
        max_timeout_s: Some(10.0),
        ..Policy::default()
    });
    let a = Caller::new("a");
    let mut slow = ExecuteCommand::new(named("s"), "1");
    slow.timeout_s = Some(60.0);
    let e = m.execute(&a, slow).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::TimeoutNotAllowed);
    // The one execution of the minute is still there.
    m.execute(&a, ExecuteCommand::new(named("s"), "1"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_language_that_is_not_the_sessions_is_refused_before_running() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let done = m
        .execute(&a, ExecuteCommand::new(conversation("c"), "x = 2"))
        .await
        .unwrap();
    let mut js = ExecuteCommand::new(Target::Id(done.session.id.clone()), "x");
    js.language = Some("javascript".into());
    let e = m.execute(&a, js).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::LanguageMismatch);
    assert_eq!(
        m.get_session(&a, &Target::Id(done.session.id.clone()))
            .unwrap()
            .executions,
        1
    );
    // Another tenant's session is not found, whatever names it.
    let b = Caller::new("b");
    let e = m
        .execute(&b, ExecuteCommand::new(Target::Id(done.session.id), "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::SessionNotFound);
    let e = m.get_session(&b, &Target::Name("c".into())).unwrap_err();
    assert_eq!(e.code(), ErrorCode::SessionNotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_execution_gets_its_own_id_and_streams_under_it() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a").with_request_id("req-1");
    let one = m
        .execute(&a, ExecuteCommand::new(named("s"), "print(1)"))
        .await
        .unwrap();
    let mut run = m
        .execute_streaming(&a, ExecuteCommand::new(named("s"), "print(2)"))
        .await
        .unwrap();
    assert_ne!(one.execution_id, run.execution_id);
    assert_eq!(run.session.id, one.session.id);
    let mut events = 0;
    while run.events.recv().await.is_some() {
        events += 1;
    }
    assert!(events >= 1);
    let result = run.outcome.await.unwrap();
    assert_eq!(result.stdout, "2\n");
}

#[test]
fn timeouts_are_cut_to_the_tenant_maximum() {
    let (m, _stats, _dir) = manager(Policy {
        max_timeout_s: Some(30.0),
        ..Policy::default()
    });
    assert_eq!(m.timeout_for("a", "python", None).unwrap(), 30.0);
    assert_eq!(m.timeout_for("a", "python", Some(5.0)).unwrap(), 5.0);
    let e = m.timeout_for("a", "python", Some(31.0)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::TimeoutNotAllowed);
    let e = m.timeout_for("a", "python", Some(-1.0)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidRequest);
    // Another tenant: the pool's maximum only.
    assert_eq!(m.timeout_for("b", "python", Some(5000.0)).unwrap(), 600.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_language_no_pool_runs_is_pool_not_found() {
    let (m, stats, _dir) = manager(Policy::default());
    let shell = Target::Conversation {
        identifier: None,
        language: Some("shell".into()),
    };
    let e = m
        .execute(&Caller::new("a"), ExecuteCommand::new(shell, "echo"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PoolNotFound);
    assert_eq!(e.to_string(), "this server runs no shell sessions");
    assert_eq!(stats.started.load(Ordering::SeqCst), 0);
}

/// Waits (at most 5 s) until `done` holds.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// A pool whose tenants fork from zygotes of their own keeps no shared stock but a small one
/// per tenant: started for that tenant, handed to it alone (a start refused meanwhile does
/// not reach the request), capped, and let go when the tenant is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_of_a_zygote_pool_gets_a_warm_stock_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = FakeEngine::new(dir.path());
    engine.per_tenant = true;
    let (stats, fail) = (engine.stats.clone(), engine.fail_starts.clone());
    let mut p = pool("python", Language::Python);
    p.warm = 4;
    p.idle_timeout = Duration::from_millis(1500);
    let m = Manager::new(
        Arc::new(engine),
        BTreeMap::from([("python".to_owned(), p)]),
        "python".into(),
        TenantLimits::default(),
        Arc::new(NoObserver),
    );
    m.start_background();
    let starts = |who: Option<&str>| {
        stats
            .tenants
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.as_deref() == who)
            .count()
    };
    let ready = || m.pools()[0].ready;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(starts(None), 0, "no stock anyone may get");
    assert_eq!(ready(), 0);

    let (a, b) = (Caller::new("a"), Caller::new("b"));
    m.get_or_create(&a, "python", "a1").await.unwrap();
    assert!(eventually(|| ready() == 2).await, "a's stock: {}", ready());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        starts(Some("a")),
        3,
        "one on demand, two ahead (capped below warm = 4)"
    );

    // The next start fails: a's second session must not need one.
    fail.store(1, Ordering::SeqCst);
    m.get_or_create(&a, "python", "a2")
        .await
        .expect("a's second session comes from its stock");
    // Its refill took the failure.
    assert!(eventually(|| fail.load(Ordering::SeqCst) == 0).await);

    // b's first session is started for b, not taken from a's stock.
    let a_stock = ready();
    let before_b = starts(Some("b"));
    m.get_or_create(&b, "python", "b1").await.unwrap();
    assert_eq!(before_b, 0);
    assert!(starts(Some("b")) >= 1, "b's session was started for b");
    assert!(
        eventually(|| ready() == a_stock + 2).await,
        "b's stock of its own"
    );

    // Idle tenants' stock is let go (and the idle sessions with it).
    let closed = stats.closed.load(Ordering::SeqCst);
    assert!(
        eventually(|| ready() == 0).await,
        "stock still held: {}",
        ready()
    );
    assert!(stats.closed.load(Ordering::SeqCst) >= closed + a_stock + 2);
    m.shutdown().await;
}
