//! Session lifecycle: serialised executions, warm stock, idle expiry, maximum lifetime, and
//! a sandbox that cannot start.

use super::*;

#[tokio::test]
async fn executions_in_one_session_are_serialized_and_first_calls_start_once() {
    let h = harness();
    let t = Instant::now();
    let (a, b) = tokio::join!(
        h.exec("", "ser-1", A, "sleep 0.3\n1"),
        h.exec("", "ser-1", A, "sleep 0.3\n2")
    );
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(b.status, StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        h.stats.started.load(Ordering::SeqCst),
        1,
        "two sandboxes for one identifier"
    );
    // Different sessions run side by side.
    let t = Instant::now();
    let _ = tokio::join!(
        h.exec("", "par-1", A, "sleep 0.3"),
        h.exec("", "par-2", A, "sleep 0.3")
    );
    assert!(
        t.elapsed() < Duration::from_millis(550),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn warm_sessions_are_handed_out_and_refilled() {
    let h = harness_with("[pools.python]\nwarm = 2\n");
    h.state.manager.start_background();
    let manager = h.state.manager.clone();
    let wait_for = |n: usize| {
        let manager = manager.clone();
        async move {
            for _ in 0..100 {
                if manager.pools()[0].ready == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("pool never had {n} ready sessions");
        }
    };
    wait_for(2).await;
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 2);
    assert_eq!(
        h.exec("", "warm-1", A, "6 * 7").await.json()["properties"]["result"],
        42
    );
    wait_for(2).await;
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 3);
    h.state.manager.shutdown().await;
    assert_eq!(
        h.stats.closed.load(Ordering::SeqCst),
        3,
        "shutdown left sessions behind"
    );
    let r = h.exec("", "warm-2", A, "1").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn idle_sessions_expire_and_every_call_resets_the_clock() {
    let h = harness_with("[pools.python]\nwarm = 0\nidle_timeout_s = 1\n");
    h.exec("", "idle-1", A, "x = 1").await;
    h.exec("", "idle-2", A, "x = 1").await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        h.call(
            "GET",
            &format!("/files?identifier=idle-1&{V1}"),
            Some(A),
            Body::empty(),
        )
        .await;
        h.state.manager.reap_once().await;
    }
    let ids: Vec<String> = h
        .state
        .manager
        .list_sessions(&ampoule_core::Caller::new("a"), None)
        .unwrap()
        .iter()
        .map(|s| s.identifier.clone())
        .collect();
    assert_eq!(ids, ["idle-1"]);
    assert_eq!(h.stats.closed.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn sessions_die_at_their_maximum_lifetime() {
    let h = harness_with("[pools.python]\nwarm = 0\nmax_lifetime_s = 1\n");
    h.exec("", "life-1", A, "x = 1").await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        h.exec("", "life-1", A, "x").await;
        h.state.manager.reap_once().await;
    }
    assert!(h.stats.closed.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn a_sandbox_that_cannot_start_is_a_503_and_the_next_call_starts_afresh() {
    let h = harness();
    h.fail_starts.store(1, Ordering::SeqCst);
    let r = h.exec("", "fail-1", A, "6 * 7").await;
    assert_aca_error(&r, StatusCode::SERVICE_UNAVAILABLE, "SessionUnavailable");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("fake"),
        "internals leaked"
    );
    h.fail_starts.store(1, Ordering::SeqCst);
    let r = h
        .json("POST", "/v1/sessions", A, json!({"identifier": "fail-2"}))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.code(), "sandbox_unavailable");
    // Nothing was counted against the pool, and the identifiers work now.
    assert_eq!(h.state.manager.pools()[1].sessions, 0);
    assert_eq!(
        h.exec("", "fail-1", A, "6 * 7").await.json()["properties"]["result"],
        42
    );
    assert_eq!(
        h.json("POST", "/v1/sessions", A, json!({"identifier": "fail-2"}))
            .await
            .status,
        StatusCode::CREATED
    );
}
