//! Durable sandboxes through every door, against the fake engine (its pause stops the
//! sandbox's processes with `SIGSTOP`, its durable files live next to where the real engine
//! keeps a disk image): the lifecycle at create and the state filter, checked; pause and
//! resume, 100 times, with a background process that writes nothing while paused and is
//! still there after; hibernation and back, 20 times, with the files byte for byte, the
//! processes gone and `session_state: "lost"`, audited and counted; idle policies (pause,
//! hibernate, delete) with one-second timers; the E2B door (`pause`, `connect`, `autoPause`,
//! lists by state) and the MCP tools.

use super::*;

use sha2::{Digest, Sha256};

/// A harness whose server keeps durable sandboxes (a data directory with the store) and
/// writes an audit log.
async fn durable_harness(extra: &str) -> Harness {
    let root = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"{}\"\n\
         [[auth.keys]]\ntenant = \"b\"\nkey_sha256 = \"{}\"\n\
         [pools.python]\nwarm = 0\n{extra}",
        root.path().join("data").display(),
        sha256_hex(A),
        sha256_hex(B)
    );
    let cfg = Config::parse(&text).unwrap();
    let engine = FakeEngine::new(root.path());
    let stats = engine.stats.clone();
    let fail_starts = engine.fail_starts.clone();
    let keys = ampoule_server::serve::keys(&cfg).unwrap();
    let state = ampoule_server::serve::state(&cfg, Arc::new(engine), keys).unwrap();
    assert_eq!(
        ampoule_server::serve::durable_store(&cfg, &state.manager).unwrap(),
        0
    );
    ampoule_server::serve::audit(&cfg, &state.manager)
        .await
        .unwrap();
    Harness {
        app: app(state.clone()),
        state,
        stats,
        fail_starts,
        root,
    }
}

fn assert_error(r: &Resp, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), code, "{}", String::from_utf8_lossy(&r.body));
}

fn ok(r: &Resp) -> Value {
    assert!(
        r.status.is_success(),
        "{}: {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Creates a sandbox of tenant A with this lifecycle: its id.
async fn create(h: &Harness, lifecycle: Value) -> String {
    let r = h
        .json("POST", "/v1/sandboxes", A, json!({"lifecycle": lifecycle}))
        .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()["id"].as_str().unwrap().to_owned()
}

async fn post(h: &Harness, id: &str, verb: &str) -> Resp {
    h.call(
        "POST",
        &format!("/v1/sandboxes/{id}/{verb}"),
        Some(A),
        Body::empty(),
    )
    .await
}

async fn get(h: &Harness, id: &str) -> Resp {
    h.call(
        "GET",
        &format!("/v1/sandboxes/{id}"),
        Some(A),
        Body::empty(),
    )
    .await
}

/// Starts `cmd` in the background: its pid.
async fn background(h: &Harness, id: &str, cmd: &str) -> u64 {
    let r = h
        .json(
            "POST",
            &format!("/v1/sandboxes/{id}/processes"),
            A,
            json!({"cmd": cmd, "background": true}),
        )
        .await;
    ok(&r)["pid"].as_u64().unwrap()
}

async fn pids(h: &Harness, id: &str) -> Vec<u64> {
    let r = h
        .call(
            "GET",
            &format!("/v1/sandboxes/{id}/processes"),
            Some(A),
            Body::empty(),
        )
        .await;
    ok(&r)["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect()
}

/// A file's bytes, read through the files API (which resumes the sandbox).
async fn read(h: &Harness, id: &str, path: &str) -> Vec<u8> {
    let r = h
        .call(
            "GET",
            &format!("/v1/sandboxes/{id}/files/{path}/content"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.body
}

async fn write(h: &Harness, id: &str, path: &str, data: Vec<u8>) {
    let r = h
        .call(
            "PUT",
            &format!("/v1/sandboxes/{id}/files/{path}"),
            Some(A),
            Body::from(data),
        )
        .await;
    assert!(
        r.status.is_success(),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

fn sha256(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Some files, one of them binary and larger than a page: their names and digests.
async fn plant_files(h: &Harness, id: &str) -> Vec<(String, String)> {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let files = vec![
        ("notes.txt".to_owned(), b"kept across states\n".to_vec()),
        ("deep/dir/data.bin".to_owned(), big),
    ];
    let mut out = Vec::new();
    for (path, data) in files {
        write(h, id, &path, data.clone()).await;
        out.push((path, sha256(&data)));
    }
    out
}

async fn check_files(h: &Harness, id: &str, files: &[(String, String)]) {
    for (path, digest) in files {
        assert_eq!(&sha256(&read(h, id, path).await), digest, "{path} changed");
    }
}

/// Bytes of the ticks file now, read on the host (the sandbox is not touched, so a paused
/// one stays paused).
fn ticks_len(h: &Harness, marker: &str) -> u64 {
    std::fs::metadata(h.durable_data(marker).join("ticks"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The data directory of a durable sandbox of the fake engine, found by a marker file.
impl Harness {
    fn durable_data(&self, marker: &str) -> PathBuf {
        let store = self.root.path().join("data/sandboxes");
        for entry in std::fs::read_dir(&store).unwrap() {
            let data = entry.unwrap().path().join("disk.img.d/data");
            if data.join(marker).exists() {
                return data;
            }
        }
        panic!("no durable sandbox holds {marker}");
    }
}

async fn audit_kinds(h: &Harness, id: &str) -> Vec<(String, Option<String>)> {
    h.state
        .manager
        .audit()
        .unwrap()
        .writer
        .flush()
        .await
        .unwrap();
    let r = h
        .call(
            "GET",
            &format!("/v1/audit?session={id}&limit=1000"),
            Some(A),
            Body::empty(),
        )
        .await;
    ok(&r)["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or_default().to_owned(),
                r["decided_by"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// The value of a metric line (`name{labels} value`) on the page.
fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

async fn scrape(h: &Harness) -> String {
    let r = h.call("GET", "/metrics", Some(A), Body::empty()).await;
    String::from_utf8(r.body).unwrap()
}

#[tokio::test]
async fn lifecycles_and_state_filters_are_checked() {
    let h = durable_harness("").await;
    for bad in [
        json!({"lifecycle": {"on_idle": "sleep"}}),
        json!({"lifecycle": {"idle_timeout_s": 0}}),
        json!({"lifecycle": {"idle_timeout_s": 1.5}}),
        json!({"lifecycle": {"delete_after_s": 3_000_000_000u64}}),
        json!({"lifecycle": {"on_timeout": "pause"}}),
        json!({"lifecycle": {"durable": "yes"}}),
        json!({"lifecycle": {"frozen": true}}),
        json!({"lifecycle": {"on_idle": "hibernate", "durable": false}}),
        json!({"lifecycle": {"on_timeout": "hibernate", "durable": false}}),
        json!({"lifecycle": []}),
    ] {
        let r = h.json("POST", "/v1/sandboxes", A, bad.clone()).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert_eq!(h.stats.started.load(Ordering::SeqCst), 0);

    // What was asked is answered back, over the pool's (none here); a policy that pauses
    // makes it durable.
    let r = h
        .json(
            "POST",
            "/v1/sandboxes",
            A,
            json!({"lifecycle": {"on_idle": "pause", "idle_timeout_s": 60, "delete_after_s": 600}}),
        )
        .await;
    let s = ok(&r);
    assert_eq!(s["durable"], true, "{s}");
    assert_eq!(s["session_state"], "kept");
    assert_eq!(s["state"], "running");
    assert_eq!(s["lifecycle"]["on_idle"], "pause");
    assert_eq!(s["lifecycle"]["idle_timeout_s"], 60);
    assert_eq!(s["lifecycle"]["delete_after_s"], 600);
    assert_eq!(s["lifecycle"]["on_timeout"], Value::Null);
    let plain = ok(&h.json("POST", "/v1/sandboxes", A, json!({})).await);
    assert_eq!(plain["durable"], false);

    for q in ["state=sleeping", "state=", "state=Running"] {
        let r = h
            .call("GET", &format!("/v1/sandboxes?{q}"), Some(A), Body::empty())
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");
    }
    for (q, n) in [("running", 2), ("paused", 0), ("hibernated", 0)] {
        let r = h
            .call(
                "GET",
                &format!("/v1/sandboxes?state={q}"),
                Some(A),
                Body::empty(),
            )
            .await;
        assert_eq!(ok(&r)["sandboxes"].as_array().unwrap().len(), n, "{q}");
    }

    // Without a store, a durable sandbox cannot be made, and says why.
    let bare = harness();
    let r = bare
        .json(
            "POST",
            "/v1/sandboxes",
            A,
            json!({"lifecycle": {"durable": true}}),
        )
        .await;
    assert_error(&r, StatusCode::NOT_IMPLEMENTED, "not_supported");

    // Resume's body is checked too.
    let id = s["id"].as_str().unwrap();
    for bad in [json!({"timeout_s": 0}), json!({"timeout": 5}), json!([1])] {
        let r = h
            .json("POST", &format!("/v1/sandboxes/{id}/resume"), A, bad)
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request");
    }
    // Another tenant's sandbox is a 404 for every verb.
    for verb in ["pause", "resume", "hibernate"] {
        let r = h
            .call(
                "POST",
                &format!("/v1/sandboxes/{id}/{verb}"),
                Some(B),
                Body::empty(),
            )
            .await;
        assert_error(&r, StatusCode::NOT_FOUND, "session_not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sandbox_stops_and_resumes_a_hundred_times() {
    let h = durable_harness("").await;
    let id = create(&h, json!({"durable": true})).await;
    write(&h, &id, "marker-pause", b"1".to_vec()).await;
    let files = plant_files(&h, &id).await;
    let pid = background(&h, &id, "while :; do date +%s%N >> ticks; sleep 0.05; done").await;
    let data = h.durable_data("marker-pause");
    let ticks = || std::fs::metadata(data.join("ticks")).map_or(0, |m| m.len());
    // It ticks.
    let t = Instant::now();
    while ticks() == 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ticks() > 0, "the background process never wrote");

    for cycle in 0..100 {
        let p = post(&h, &id, "pause").await;
        assert_eq!(ok(&p)["state"], "paused", "cycle {cycle}");
        if cycle % 25 == 0 {
            // Frozen: no tick for 150 ms (a tick is written every 50 ms while it runs).
            tokio::time::sleep(Duration::from_millis(30)).await;
            let before = ticks();
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(ticks(), before, "cycle {cycle}: it ticked while paused");
            assert_eq!(ok(&get(&h, &id).await)["state"], "paused");
            let listed = h
                .call("GET", "/v1/sandboxes?state=paused", Some(A), Body::empty())
                .await;
            assert_eq!(ok(&listed)["sandboxes"][0]["id"], id.as_str());
            // Pausing a paused sandbox answers it as it is.
            assert_eq!(ok(&post(&h, &id, "pause").await)["state"], "paused");
        }
        let r = post(&h, &id, "resume").await;
        let r = ok(&r);
        assert_eq!(r["state"], "running", "cycle {cycle}");
        assert_eq!(r["session_state"], "kept", "cycle {cycle}");
    }
    // It ticks again, it is the same process, the files are the same.
    let before = ticks();
    let t = Instant::now();
    while ticks() == before && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        ticks() > before,
        "it did not run again after the last resume"
    );
    assert_eq!(pids(&h, &id).await, vec![pid]);
    check_files(&h, &id, &files).await;

    // Any call that names a paused sandbox runs it again.
    ok(&post(&h, &id, "pause").await);
    assert_eq!(pids(&h, &id).await, vec![pid]);
    assert_eq!(ok(&get(&h, &id).await)["state"], "running");

    // A pause waits for no execution: refused while one runs.
    let exec = {
        let h_app = h.app.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let req = Request::builder()
                .method("POST")
                .uri(format!("/v1/sandboxes/{id}/executions"))
                .header("authorization", format!("Bearer {A}"))
                .header("content-type", "application/json")
                .body(Body::from(json!({"code": "sleep 0.6\n1"}).to_string()))
                .unwrap();
            h_app.oneshot(req).await.unwrap().status()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_error(
        &post(&h, &id, "pause").await,
        StatusCode::CONFLICT,
        "conflict",
    );
    assert_eq!(exec.await.unwrap(), StatusCode::OK);

    // Counted: pauses and resumes, and the gauges.
    ok(&post(&h, &id, "pause").await);
    let page = scrape(&h).await;
    assert_eq!(
        metric(&page, "ampoule_sandboxes{state=\"paused\"}"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        metric(&page, "ampoule_sandboxes{state=\"running\"}"),
        Some(0.0)
    );
    let pauses = metric(
        &page,
        "ampoule_sandbox_transition_seconds_count{pool=\"python\",event=\"pause\"}",
    )
    .unwrap();
    assert!(pauses >= 100.0, "{pauses}");
    assert!(
        metric(
            &page,
            "ampoule_sandbox_transition_seconds_count{pool=\"python\",event=\"resume\"}"
        )
        .unwrap()
            >= 100.0
    );
    let kinds = audit_kinds(&h, &id).await;
    let paused = kinds.iter().filter(|(k, _)| k == "sandbox_paused").count();
    assert!(paused >= 100, "{kinds:?}");
    assert!(
        kinds
            .iter()
            .any(|(k, why)| k == "sandbox_resumed" && why.as_deref() == Some("memory_kept")),
        "{kinds:?}"
    );
    // Deleted while paused: its files go too.
    let r = h
        .call(
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(!data.exists(), "a deleted sandbox's files stayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_sandbox_comes_back_with_its_files_twenty_times() {
    let h = durable_harness("").await;
    let id = create(&h, json!({"durable": true})).await;
    let token_before = h
        .state
        .manager
        .sandbox_tokens(&ampoule_core::Caller::new("a".to_owned()), &id);
    write(&h, &id, "marker-hib", b"1".to_vec()).await;
    let files = plant_files(&h, &id).await;
    background(&h, &id, "while :; do date +%s%N >> ticks; sleep 0.05; done").await;

    // Not durable: refused.
    let plain = create(&h, json!({})).await;
    assert_error(
        &post(&h, &plain, "hibernate").await,
        StatusCode::CONFLICT,
        "conflict",
    );

    for cycle in 0..20 {
        let r = post(&h, &id, "hibernate").await;
        let s = ok(&r);
        assert_eq!(s["state"], "hibernated", "cycle {cycle}: {s}");
        assert_eq!(s["durable"], true);
        let g = ok(&get(&h, &id).await);
        assert_eq!(g["state"], "hibernated", "reading it does not wake it");
        if cycle == 0 {
            let listed = h
                .call(
                    "GET",
                    "/v1/sandboxes?state=hibernated",
                    Some(A),
                    Body::empty(),
                )
                .await;
            assert_eq!(ok(&listed)["sandboxes"][0]["id"], id.as_str());
            let page = scrape(&h).await;
            assert_eq!(
                metric(&page, "ampoule_sandboxes{state=\"hibernated\"}"),
                Some(1.0),
                "{page}"
            );
            // Hibernating a hibernated sandbox answers it as it is.
            assert_eq!(ok(&post(&h, &id, "hibernate").await)["state"], "hibernated");
            // The ticks stopped with it.
            let before = ticks_len(&h, "marker-hib");
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(ticks_len(&h, "marker-hib"), before);
        }
        let r = post(&h, &id, "resume").await;
        let s = ok(&r);
        assert_eq!(s["state"], "running", "cycle {cycle}");
        assert_eq!(s["session_state"], "lost", "cycle {cycle}: never silently");
        assert!(
            pids(&h, &id).await.is_empty(),
            "cycle {cycle}: a process survived hibernation"
        );
        check_files(&h, &id, &files).await;
    }
    // Same id, same tokens.
    let token_after = h
        .state
        .manager
        .sandbox_tokens(&ampoule_core::Caller::new("a".to_owned()), &id);
    assert_eq!(token_before.unwrap().access, token_after.unwrap().access);
    // A file call wakes a hibernated sandbox too.
    ok(&post(&h, &id, "hibernate").await);
    check_files(&h, &id, &files).await;
    assert_eq!(ok(&get(&h, &id).await)["state"], "running");

    let kinds = audit_kinds(&h, &id).await;
    let count = |kind: &str| kinds.iter().filter(|(k, _)| k == kind).count();
    assert!(count("sandbox_hibernated") >= 21, "{kinds:?}");
    assert!(
        kinds
            .iter()
            .filter(|(k, why)| k == "sandbox_resumed" && why.as_deref() == Some("memory_lost"))
            .count()
            >= 21,
        "{kinds:?}"
    );
    let page = scrape(&h).await;
    assert!(
        metric(
            &page,
            "ampoule_sandbox_transition_seconds_count{pool=\"python\",event=\"restore\"}"
        )
        .unwrap()
            >= 21.0,
        "{page}"
    );
    // Deleted while hibernated: gone, its files too.
    ok(&post(&h, &id, "hibernate").await);
    let r = h
        .call(
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            Some(A),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_error(
        &get(&h, &id).await,
        StatusCode::NOT_FOUND,
        "session_not_found",
    );
    assert!(
        !h.root.path().join("data/sandboxes").join(&id).exists(),
        "a deleted hibernated sandbox left its files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_policies_pause_hibernate_and_delete() {
    let h = durable_harness("").await;
    h.state.manager.start_background();
    let busy = create(&h, json!({"on_idle": "pause", "idle_timeout_s": 1})).await;
    background(&h, &busy, "sleep 30").await;
    let idle = create(&h, json!({"on_idle": "pause", "idle_timeout_s": 1})).await;
    let sleepy = create(&h, json!({"on_idle": "hibernate", "idle_timeout_s": 1})).await;
    write(&h, &sleepy, "kept.txt", b"still here".to_vec()).await;
    let doomed = create(&h, json!({"on_idle": "delete", "idle_timeout_s": 1})).await;
    let plain = create(&h, json!({})).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ok(&get(&h, &busy).await)["state"],
        "running",
        "a sandbox with a running process is not idle"
    );
    assert_eq!(ok(&get(&h, &idle).await)["state"], "paused");
    assert_eq!(ok(&get(&h, &sleepy).await)["state"], "hibernated");
    assert_error(
        &get(&h, &doomed).await,
        StatusCode::NOT_FOUND,
        "session_not_found",
    );
    assert_eq!(
        ok(&get(&h, &plain).await)["state"],
        "running",
        "no policy: it lives until its timeout"
    );
    // Back on use.
    assert_eq!(read(&h, &sleepy, "kept.txt").await, b"still here");
    assert_eq!(ok(&get(&h, &sleepy).await)["session_state"], "lost");
    let kinds = audit_kinds(&h, &idle).await;
    assert!(
        kinds.iter().any(|(k, _)| k == "sandbox_paused"),
        "{kinds:?}"
    );
}

/// A control-plane request of the E2B door.
async fn e2b(h: &Harness, method: &str, uri: &str, body: Option<Value>) -> Resp {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("x-api-key", A);
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    h.send(req.body(body).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_e2b_door_pauses_auto_pauses_and_connects() {
    let h = durable_harness("").await;
    h.state.manager.start_background();
    // `autoPause`: hibernated at the end of its timeout, listed as paused, back on connect
    // with its files and `sessionState: "lost"`.
    let r = e2b(
        &h,
        "POST",
        "/v2/sandboxes",
        Some(
            json!({"templateID": "base", "timeout": 1, "autoPause": true, "autoPauseMemory": true}),
        ),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let sbx = r.json();
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();
    write(&h, &id, "e2b.txt", b"auto".to_vec()).await;
    let v1 = ok(&get(&h, &id).await);
    assert_eq!(v1["durable"], true);
    assert_eq!(v1["lifecycle"]["on_timeout"], "hibernate");
    let t = Instant::now();
    while ok(&get(&h, &id).await)["state"] != "hibernated" {
        assert!(t.elapsed() < Duration::from_secs(6), "never auto-paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let paused = e2b(&h, "GET", "/v2/sandboxes?state=paused", None).await;
    let l = paused.json();
    assert_eq!(l[0]["sandboxID"], id.as_str(), "{l}");
    assert_eq!(l[0]["state"], "paused", "E2B knows two states");
    // Hibernated: its memory is gone already, and it says so.
    assert_eq!(l[0]["sessionState"], "lost");
    let running = e2b(&h, "GET", "/v2/sandboxes?state=running", None).await;
    assert_eq!(running.json(), json!([]));
    let bad = e2b(&h, "GET", "/v2/sandboxes?state=asleep", None).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let info = e2b(&h, "GET", &format!("/sandboxes/{id}"), None).await;
    assert_eq!(info.json()["state"], "paused");
    // Pausing it again: 409 (the SDKs answer `false`).
    let again = e2b(&h, "POST", &format!("/sandboxes/{id}/pause"), None).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    let c = e2b(
        &h,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"timeout": 300})),
    )
    .await;
    assert_eq!(
        c.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&c.body)
    );
    let c = c.json();
    assert_eq!(c["sandboxID"], id.as_str());
    assert_eq!(c["envdAccessToken"], sbx["envdAccessToken"]);
    assert_eq!(c["sessionState"], "lost", "never silently");
    assert_eq!(read(&h, &id, "e2b.txt").await, b"auto");
    // Connecting to a running sandbox: 200.
    let c = e2b(
        &h,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({})),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK);

    // A filesystem-only pause of a durable sandbox is a hibernation; `resume` brings it back.
    let p = e2b(
        &h,
        "POST",
        &format!("/sandboxes/{id}/pause"),
        Some(json!({"memory": false})),
    )
    .await;
    assert_eq!(
        p.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&p.body)
    );
    assert_eq!(ok(&get(&h, &id).await)["state"], "hibernated");
    let r = e2b(
        &h,
        "POST",
        &format!("/sandboxes/{id}/resume"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(ok(&get(&h, &id).await)["state"], "running");

    // A pause keeps memory; `connect` with `memory: false` drops it (E2B's reboot).
    let p = e2b(&h, "POST", &format!("/sandboxes/{id}/pause"), None).await;
    assert_eq!(p.status, StatusCode::NO_CONTENT);
    assert_eq!(ok(&get(&h, &id).await)["state"], "paused");
    let c = e2b(
        &h,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        Some(json!({"memory": false})),
    )
    .await;
    assert_eq!(c.status, StatusCode::CREATED);
    assert_eq!(c.json()["sessionState"], "lost");
    // Unknown: 404.
    let p = e2b(&h, "POST", "/sandboxes/sbx_00/pause", None).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
}

/// An MCP `tools/call`: the reply's first text content, as JSON when it is.
async fn mcp_tool(h: &Harness, tool: &str, args: Value) -> (bool, Value) {
    let call = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": args},
    });
    let req = Request::builder()
        .method("POST")
        .uri("/mcp")
        .header("authorization", format!("Bearer {A}"))
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Body::from(call.to_string()))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    let result = &v["result"];
    let text = result["content"][0]["text"].as_str().unwrap_or_default();
    (
        result["isError"].as_bool().unwrap_or(false),
        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned())),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tools_pause_resume_and_hibernate_by_session_name() {
    let h = durable_harness("[pools.python.lifecycle]\ndurable = true\n").await;
    let (err, out) = mcp_tool(
        &h,
        "execute_code",
        json!({"code": "1", "session": "notebook"}),
    )
    .await;
    assert!(!err, "{out}");
    let (err, out) = mcp_tool(&h, "pause_sandbox", json!({"sandbox_id": "notebook"})).await;
    assert!(!err, "{out}");
    assert_eq!(out["state"], "paused", "{out}");
    assert_eq!(out["session"], "notebook");
    let id = out["sandbox_id"].as_str().unwrap().to_owned();
    let (err, out) = mcp_tool(&h, "resume_sandbox", json!({"sandbox_id": id})).await;
    assert!(!err, "{out}");
    assert_eq!(out["state"], "running");
    assert_eq!(out["session_state"], "kept");
    let (err, out) = mcp_tool(&h, "hibernate_sandbox", json!({"sandbox_id": "notebook"})).await;
    assert!(!err, "{out}");
    assert_eq!(out["state"], "hibernated");
    // Named while hibernated: found, and back without its memory.
    let (err, out) = mcp_tool(&h, "resume_sandbox", json!({"sandbox_id": "notebook"})).await;
    assert!(!err, "{out}");
    assert_eq!(out["session_state"], "lost", "{out}");
    let (err, out) = mcp_tool(&h, "pause_sandbox", json!({"sandbox_id": "nobody"})).await;
    assert!(err, "{out}");
    assert!(out.as_str().unwrap().contains("session_not_found"), "{out}");
}
