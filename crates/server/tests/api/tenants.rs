//! Keys and tenants: authentication quirks, tenants that never see each other, pool and
//! tenant limits on both doors.

use super::*;

#[tokio::test]
async fn auth_quirks() {
    let h = harness();
    let uri = format!("/code/execute?identifier=auth-0001&{V1}");
    let body = || Body::from(json!({"properties": {"code": "1"}}).to_string());
    for auth in [
        None,
        Some("Bearer None"),
        Some("Bearer "),
        Some("Bearer wrong"),
        Some("Basic a2V5"),
    ] {
        let mut req = Request::builder().method("POST").uri(&uri);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = h.send(req.body(body()).unwrap()).await;
        assert_aca_error(&r, StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let r = h
        .call("GET", "/v1/sessions", Some("None"), Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "unauthorized");
    assert!(!r.headers.contains_key("x-ms-error-code"));
    // Health and the OpenAPI document need no key.
    assert_eq!(
        h.call("GET", "/healthz", None, Body::empty()).await.json()["status"],
        "ok"
    );
    assert_eq!(
        h.call("GET", "/openapi.json", None, Body::empty())
            .await
            .json()["openapi"],
        "3.1.0"
    );
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_full_pool_answers_404_on_aca_and_429_on_v1() {
    let h = harness_with("[pools.python]\nwarm = 0\nmax_sessions = 2\n");
    assert_eq!(h.exec("", "p-1", A, "1").await.status, StatusCode::OK);
    assert_eq!(h.exec("", "p-2", B, "1").await.status, StatusCode::OK);
    let r = h.exec("", "p-3", A, "1").await;
    assert_aca_error(&r, StatusCode::NOT_FOUND, "SessionPoolMaxSessionsReached");
    let r = h.json("POST", "/v1/sessions", A, json!({})).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "pool_full");
    // Existing sessions still work; a delete makes room.
    assert_eq!(h.exec("", "p-1", A, "2").await.status, StatusCode::OK);
    h.call("DELETE", "/session?identifier=p-1", Some(A), Body::empty())
        .await;
    assert_eq!(h.exec("", "p-3", A, "1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_tenant_limit_holds_across_pools() {
    let h = harness_with(
        "[server]\nmax_sessions_per_tenant = 5\n[tenants.a]\nmax_sessions = 1\n\
         [pools.python]\nwarm = 0\n[pools.other]\nwarm = 0\n",
    );
    assert_eq!(h.exec("", "t-1", A, "1").await.status, StatusCode::OK);
    let r = h.exec("/pools/other", "t-2", A, "1").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = h
        .json("POST", "/v1/sessions", A, json!({"pool": "other"}))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "tenant_full");
    // Tenant b is not limited by a's limit.
    assert_eq!(
        h.exec("/pools/other", "t-2", B, "1").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let h = harness();
    // Tenant A: a session with state and a file.
    h.exec("", "shared-name", A, "x = 41").await;
    h.upload(
        &format!("/files/upload?identifier=shared-name&{V1}"),
        A,
        "multipart/form-data; boundary=z",
        multipart("z", "a-secret.txt", b"A's data"),
    )
    .await;
    let a_session = h
        .json(
            "POST",
            "/v1/sessions",
            A,
            json!({"identifier": "shared-name"}),
        )
        .await;
    assert_eq!(a_session.status, StatusCode::OK);
    let a_id = a_session.json()["id"].as_str().unwrap().to_owned();

    // ACA: B cannot delete A's session...
    let r = h
        .call(
            "DELETE",
            "/session?identifier=shared-name",
            Some(B),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = h
        .call(
            "GET",
            "/session?identifier=shared-name&api-version=2025-02-02-preview",
            Some(B),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // ...and the same identifier names B's own, empty session.
    let p = h.exec("", "shared-name", B, "x").await.json()["properties"].clone();
    assert_eq!(p["status"], "Failure", "B saw A's state: {p}");
    let list = h
        .call(
            "GET",
            &format!("/files?identifier=shared-name&{V1}"),
            Some(B),
            Body::empty(),
        )
        .await
        .json();
    assert_eq!(list["value"], json!([]));
    let r = h
        .call(
            "GET",
            &format!("/files/content/a-secret.txt?identifier=shared-name&{V1}"),
            Some(B),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let l = h
        .call("GET", "/listSessions", Some(B), Body::empty())
        .await
        .json();
    assert_eq!(l["sessions"].as_array().unwrap().len(), 1);

    // Native: A's session id is a 404 for B on every path.
    for (method, path) in [
        ("GET", format!("/v1/sessions/{a_id}")),
        ("DELETE", format!("/v1/sessions/{a_id}")),
        ("GET", format!("/v1/sessions/{a_id}/files")),
        (
            "GET",
            format!("/v1/sessions/{a_id}/files/a-secret.txt/content"),
        ),
        ("GET", format!("/v1/sessions/{a_id}/files/a-secret.txt")),
        ("DELETE", format!("/v1/sessions/{a_id}/files/a-secret.txt")),
        ("PUT", format!("/v1/sessions/{a_id}/files/planted.txt")),
    ] {
        let r = h.call(method, &path, Some(B), Body::from("x")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(r.code(), "session_not_found");
    }
    for suffix in ["executions", "executions/stream"] {
        let r = h
            .json(
                "POST",
                &format!("/v1/sessions/{a_id}/{suffix}"),
                B,
                json!({"code": "x"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    let mine = h
        .call("GET", "/v1/sessions", Some(B), Body::empty())
        .await
        .json();
    assert!(
        mine["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["id"] != a_id.as_str())
    );

    // A's session is untouched.
    assert_eq!(
        h.exec("", "shared-name", A, "x + 1").await.json()["properties"]["result"],
        42
    );
    let got = h
        .call(
            "GET",
            &format!("/files/content/a-secret.txt?identifier=shared-name&{V1}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(got.body, b"A's data");
}
