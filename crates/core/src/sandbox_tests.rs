//! Sandboxes over the fake engine: their life (metadata, timeout, kill), tenants and tokens,
//! contexts sharing the sandbox's files, and processes (output, exit, stdin, signals, tags,
//! re-attaching) counted by the rate limit; sessions keep answering as sessions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use crate::quota::Policy;
use crate::sandbox::{Command, CreateContext, CreateSandbox, ProcessEvent, StartProcess};
use crate::tests::manager;
use crate::{
    Caller, ErrorCode, ExecuteCommand, Manager, ProcessEnd, ProcessSelector, ProcessStream, Target,
};

async fn sandbox(m: &Manager, caller: &Caller, metadata: &[(&str, &str)]) -> String {
    let cmd = CreateSandbox {
        metadata: metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..CreateSandbox::default()
    };
    m.create_sandbox(caller, cmd).await.unwrap().0.id
}

fn shell(line: &str) -> StartProcess {
    StartProcess::new(Command::Shell(line.into()))
}

/// Everything a process writes until it ends, and how it ended.
async fn drain(mut p: ProcessStream) -> (String, String, ProcessEnd) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let wait = async {
        while let Some(ev) = p.events.recv().await {
            match ev {
                ProcessEvent::Stdout(b) => out.extend_from_slice(&b),
                ProcessEvent::Stderr(b) => err.extend_from_slice(&b),
                ProcessEvent::End(end) => return end,
            }
        }
        panic!("the events ended without an end");
    };
    let end = tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("the process did not end");
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        end,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_are_created_listed_by_metadata_and_killed() {
    let (m, stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let cmd = CreateSandbox {
        metadata: BTreeMap::from([("team".into(), "red".into())]),
        envs: BTreeMap::from([("GREETING".into(), "hi".into())]),
        timeout_s: Some(60),
        ..CreateSandbox::default()
    };
    let (info, tokens) = m.create_sandbox(&a, cmd).await.unwrap();
    assert!(info.id.starts_with("sbx_"), "{}", info.id);
    assert_eq!(info.pool, "python");
    assert!(info.is_sandbox);
    assert_eq!(info.env_names, ["GREETING"]);
    assert_ne!(tokens.access, tokens.traffic);
    let left = info.end_at.duration_since(info.created_at).unwrap();
    assert!(left > Duration::from_secs(55) && left <= Duration::from_secs(61));
    let blue = sandbox(&m, &a, &[("team", "blue")]).await;
    assert_eq!(stats.started.load(std::sync::atomic::Ordering::SeqCst), 2);

    assert_eq!(m.get_sandbox(&a, &info.id).unwrap().metadata["team"], "red");
    let red: Vec<String> = m
        .list_sandboxes(&a, &BTreeMap::from([("team".into(), "red".into())]), None)
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(red, std::slice::from_ref(&info.id));
    assert_eq!(m.list_sandboxes(&a, &BTreeMap::new(), None).len(), 2);
    assert!(
        m.list_sandboxes(&a, &BTreeMap::from([("team".into(), "green".into())]), None)
            .is_empty()
    );

    m.kill_sandbox(&a, &info.id).await.unwrap();
    let e = m.get_sandbox(&a, &info.id).unwrap_err();
    assert_eq!(e.code(), ErrorCode::SessionNotFound);
    assert_eq!(
        m.kill_sandbox(&a, &info.id).await.unwrap_err().code(),
        ErrorCode::SessionNotFound
    );
    assert_eq!(m.list_sandboxes(&a, &BTreeMap::new(), None)[0].id, blue);
    assert_eq!(stats.closed.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Bad input is refused before anything starts.
    let bad = CreateSandbox {
        envs: BTreeMap::from([("A=B".into(), "x".into())]),
        ..CreateSandbox::default()
    };
    assert_eq!(
        m.create_sandbox(&a, bad).await.unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
    let zero = CreateSandbox {
        timeout_s: Some(0),
        ..CreateSandbox::default()
    };
    assert_eq!(
        m.create_sandbox(&a, zero).await.unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
    let nowhere = CreateSandbox {
        pool: Some("nowhere".into()),
        ..CreateSandbox::default()
    };
    assert_eq!(
        m.create_sandbox(&a, nowhere).await.unwrap_err().code(),
        ErrorCode::PoolNotFound
    );
    assert_eq!(stats.started.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_ends_at_its_timeout_however_busy_and_a_session_when_idle() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let cmd = CreateSandbox {
        timeout_s: Some(1),
        ..CreateSandbox::default()
    };
    let short = m.create_sandbox(&a, cmd).await.unwrap().0.id;
    let long = sandbox(&m, &a, &[]).await;
    let session = m
        .execute(
            &a,
            ExecuteCommand::new(
                Target::Named {
                    pool: None,
                    identifier: "s".into(),
                },
                "1",
            ),
        )
        .await
        .unwrap()
        .session
        .id;
    // Pushed back: still alive after the first second.
    let pushed = m
        .create_sandbox(
            &a,
            CreateSandbox {
                timeout_s: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .0
        .id;
    m.set_sandbox_timeout(&a, &pushed, 30).await.unwrap();
    assert_eq!(m.reap_once().await, 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(m.reap_once().await, 1);
    assert_eq!(
        m.get_sandbox(&a, &short).unwrap_err().code(),
        ErrorCode::SessionNotFound
    );
    m.get_sandbox(&a, &long).unwrap();
    m.get_sandbox(&a, &pushed).unwrap();
    let s = m.get_sandbox(&a, &session).unwrap();
    assert!(!s.is_sandbox);
    assert_eq!(
        m.set_sandbox_timeout(&a, &long, 0)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::InvalidRequest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_routes_languages_to_contexts_and_a_session_still_refuses_them() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let aca = Target::Named {
        pool: None,
        identifier: "aca".into(),
    };
    m.execute(&a, ExecuteCommand::new(aca.clone(), "x = 1"))
        .await
        .unwrap();
    let mut js = ExecuteCommand::new(aca, "1");
    js.language = Some("javascript".into());
    assert_eq!(
        m.execute(&a, js).await.unwrap_err().code(),
        ErrorCode::LanguageMismatch
    );

    let id = sandbox(&m, &a, &[]).await;
    let mut js = ExecuteCommand::new(Target::Id(id.clone()), "y = 2\ny * 3");
    js.language = Some("javascript".into());
    let done = m.execute(&a, js).await.unwrap();
    assert_eq!(done.result.result.unwrap()["application/json"], 6);
    let contexts = m.list_contexts(&a, &id).await.unwrap();
    assert_eq!(contexts.len(), 2, "{contexts:?}");
    assert_eq!(contexts[0].id, "default");
    assert_eq!(contexts[1].language, ampoule_types::Language::Javascript);
    // The javascript context keeps its state; the default context has none of it.
    let mut again = ExecuteCommand::new(Target::Id(id.clone()), "y");
    again.language = Some("javascript".into());
    assert_eq!(
        m.execute(&a, again).await.unwrap().result.result.unwrap()["application/json"],
        2
    );
    let default = m
        .execute(&a, ExecuteCommand::new(Target::Id(id.clone()), "y"))
        .await
        .unwrap();
    assert_eq!(default.result.error.unwrap().name, "NameError");
    // A context by id, and one that is not there.
    let mut by_id = ExecuteCommand::new(Target::Id(id.clone()), "y");
    by_id.context = Some(contexts[1].id.clone());
    assert_eq!(
        m.execute(&a, by_id).await.unwrap().result.result.unwrap()["application/json"],
        2
    );
    let mut missing = ExecuteCommand::new(Target::Id(id.clone()), "1");
    missing.context = Some("ctx_nope".into());
    assert_eq!(
        m.execute(&a, missing).await.unwrap_err().code(),
        ErrorCode::ContextNotFound
    );
    let mut both = ExecuteCommand::new(Target::Id(id), "1");
    both.context = Some("default".into());
    both.language = Some("python".into());
    assert_eq!(
        m.execute(&a, both).await.unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_share_the_sandboxes_files_and_restart_with_fresh_state() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let id = sandbox(&m, &a, &[]).await;
    m.execute(
        &a,
        ExecuteCommand::new(Target::Id(id.clone()), "write shared.txt hello"),
    )
    .await
    .unwrap();
    let ctx = m
        .create_context(
            &a,
            &id,
            CreateContext {
                language: Some("python".into()),
                cwd: None,
            },
        )
        .await
        .unwrap();
    assert!(ctx.id.starts_with("ctx_"));
    assert_eq!(ctx.cwd, "/mnt/data");
    let mut read = ExecuteCommand::new(Target::Id(id.clone()), "read shared.txt\nk = 5");
    read.context = Some(ctx.id.clone());
    let done = m.execute(&a, read).await.unwrap();
    assert_eq!(done.result.stdout, "hello");
    // And the other way round.
    let mut write = ExecuteCommand::new(Target::Id(id.clone()), "write back.txt ok");
    write.context = Some(ctx.id.clone());
    m.execute(&a, write).await.unwrap();
    let back = m
        .execute(
            &a,
            ExecuteCommand::new(Target::Id(id.clone()), "read back.txt"),
        )
        .await
        .unwrap();
    assert_eq!(back.result.stdout, "ok");

    assert_eq!(m.get_context(&a, &id, &ctx.id).await.unwrap(), ctx);
    m.restart_context(&a, &id, &ctx.id).await.unwrap();
    let mut k = ExecuteCommand::new(Target::Id(id.clone()), "k");
    k.context = Some(ctx.id.clone());
    assert_eq!(
        m.execute(&a, k).await.unwrap().result.error.unwrap().name,
        "NameError"
    );
    let e = m.restart_context(&a, &id, "default").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotSupported);
    assert_eq!(
        m.delete_context(&a, &id, "default")
            .await
            .unwrap_err()
            .code(),
        ErrorCode::InvalidRequest
    );
    m.delete_context(&a, &id, &ctx.id).await.unwrap();
    assert_eq!(
        m.get_context(&a, &id, &ctx.id).await.unwrap_err().code(),
        ErrorCode::ContextNotFound
    );
    assert_eq!(
        m.delete_context(&a, &id, &ctx.id).await.unwrap_err().code(),
        ErrorCode::ContextNotFound
    );
    let bad = CreateContext {
        language: Some("cobol".into()),
        cwd: None,
    };
    assert_eq!(
        m.create_context(&a, &id, bad).await.unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
    let bad = CreateContext {
        language: None,
        cwd: Some("../etc".into()),
    };
    assert_eq!(
        m.create_context(&a, &id, bad).await.unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_sandbox_context_and_process_are_not_found() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let b = Caller::new("b");
    let id = sandbox(&m, &a, &[("k", "v")]).await;
    let ctx = m
        .create_context(&a, &id, CreateContext::default())
        .await
        .unwrap();
    let mut p = shell("sleep 30");
    p.tag = Some("t".into());
    let started = m.start_process(&a, &id, p).await.unwrap();
    let pid = ProcessSelector::Pid(started.info.pid);

    let nf = ErrorCode::SessionNotFound;
    assert_eq!(m.get_sandbox(&b, &id).unwrap_err().code(), nf);
    assert!(m.list_sandboxes(&b, &BTreeMap::new(), None).is_empty());
    assert_eq!(m.kill_sandbox(&b, &id).await.unwrap_err().code(), nf);
    assert_eq!(
        m.set_sandbox_timeout(&b, &id, 10).await.unwrap_err().code(),
        nf
    );
    assert_eq!(m.list_contexts(&b, &id).await.unwrap_err().code(), nf);
    assert_eq!(
        m.get_context(&b, &id, &ctx.id).await.unwrap_err().code(),
        nf
    );
    assert_eq!(
        m.delete_context(&b, &id, &ctx.id).await.unwrap_err().code(),
        nf
    );
    assert_eq!(
        m.create_context(&b, &id, CreateContext::default())
            .await
            .unwrap_err()
            .code(),
        nf
    );
    assert_eq!(m.list_processes(&b, &id).await.unwrap_err().code(), nf);
    assert_eq!(
        m.attach_process(&b, &id, &pid).await.unwrap_err().code(),
        nf
    );
    assert_eq!(
        m.signal_process(&b, &id, &pid, 9).await.unwrap_err().code(),
        nf
    );
    assert_eq!(
        m.write_stdin(&b, &id, &pid, b"x").await.unwrap_err().code(),
        nf
    );
    assert_eq!(
        m.start_process(&b, &id, shell("true"))
            .await
            .unwrap_err()
            .code(),
        nf
    );
    assert_eq!(m.connect_port(&b, &id, 80).await.unwrap_err().code(), nf);
    let mut exec = ExecuteCommand::new(Target::Id(id.clone()), "1");
    exec.context = Some(ctx.id.clone());
    assert_eq!(m.execute(&b, exec).await.unwrap_err().code(), nf);
    // Still running for its owner.
    assert_eq!(m.list_processes(&a, &id).await.unwrap().len(), 1);
    m.kill_sandbox(&a, &id).await.unwrap();
    let (_, _, end) = drain(started).await;
    assert_eq!(
        end.signal,
        Some(9),
        "the process died with its sandbox: {end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_grant_their_own_sandbox_only() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let (one, tokens) = m
        .create_sandbox(&a, CreateSandbox::default())
        .await
        .unwrap();
    let (two, _) = m
        .create_sandbox(&a, CreateSandbox::default())
        .await
        .unwrap();
    let c = m
        .caller_for_token(&one.id, &tokens.access, false, Some("r".into()))
        .unwrap();
    assert_eq!(c.tenant, "a");
    assert_eq!(c.request_id.as_deref(), Some("r"));
    m.caller_for_token(&one.id, &tokens.traffic, true, None)
        .unwrap();
    for (id, token, traffic) in [
        (&one.id, &tokens.access, true),
        (&one.id, &tokens.traffic, false),
        (&two.id, &tokens.access, false),
        (&one.id, &"ea_wrong".to_owned(), false),
        (&"sbx_nope".to_owned(), &tokens.access, false),
    ] {
        let e = m.caller_for_token(id, token, traffic, None).unwrap_err();
        assert_eq!(
            e.code(),
            ErrorCode::SessionNotFound,
            "{id} {token} {traffic}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_stream_output_exit_codes_and_read_stdin() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let id = {
        let cmd = CreateSandbox {
            envs: BTreeMap::from([("WHO".into(), "sandbox".into())]),
            ..CreateSandbox::default()
        };
        m.create_sandbox(&a, cmd).await.unwrap().0.id
    };
    let mut p = shell("echo out-$WHO-$EXTRA; echo err >&2; pwd; exit 3");
    p.envs = BTreeMap::from([("EXTRA".into(), "x".into())]);
    let (out, err, end) = drain(m.start_process(&a, &id, p).await.unwrap()).await;
    assert!(out.starts_with("out-sandbox-x\n"), "{out}");
    // The working directory is the sandbox's /mnt/data.
    assert!(out.trim_end().ends_with("/data"), "{out}");
    assert_eq!(err, "err\n");
    assert_eq!((end.exit_code, end.signal, end.timed_out), (3, None, false));
    assert_eq!(end.status(), "exit status 3");

    let argv = StartProcess::new(Command::Argv(vec![
        "printf".into(),
        "%s|".into(),
        "a b".into(),
        "c".into(),
    ]));
    let (out, _, end) = drain(m.start_process(&a, &id, argv).await.unwrap()).await;
    assert_eq!((out.as_str(), end.exit_code), ("a b|c|", 0));

    // A program that is not there ends at once, like a shell's 127.
    let nothing = StartProcess::new(Command::Argv(vec!["/no/such/program".into()]));
    let (_, err, end) = drain(m.start_process(&a, &id, nothing).await.unwrap()).await;
    assert_eq!(end.exit_code, 127, "{err}");

    let mut cat = shell("cat; echo done");
    cat.stdin = true;
    let cat = m.start_process(&a, &id, cat).await.unwrap();
    let pid = ProcessSelector::Pid(cat.info.pid);
    m.write_stdin(&a, &id, &pid, b"hello ").await.unwrap();
    m.write_stdin(&a, &id, &pid, b"world\n").await.unwrap();
    m.close_stdin(&a, &id, &pid).await.unwrap();
    let (out, _, end) = drain(cat).await;
    assert_eq!(out, "hello world\ndone\n");
    assert_eq!(end.exit_code, 0);

    // Without `stdin`, there is none to write to.
    let mut quiet = shell("sleep 5");
    quiet.tag = Some("quiet".into());
    let quiet = m.start_process(&a, &id, quiet).await.unwrap();
    let e = m
        .write_stdin(&a, &id, &ProcessSelector::Tag("quiet".into()), b"x")
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidRequest);
    m.signal_process(&a, &id, &ProcessSelector::Pid(quiet.info.pid), 9)
        .await
        .unwrap();
    drain(quiet).await;

    // Refused before anything runs.
    for bad in [
        StartProcess::new(Command::Argv(vec![])),
        StartProcess::new(Command::Argv(vec!["a\0b".into()])),
        StartProcess {
            cwd: Some("relative".into()),
            ..shell("true")
        },
        StartProcess {
            cwd: Some("/mnt/data/../..".into()),
            ..shell("true")
        },
        StartProcess {
            timeout_s: Some(-1.0),
            ..shell("true")
        },
        StartProcess {
            timeout_s: Some(f64::NAN),
            ..shell("true")
        },
    ] {
        let e = m.start_process(&a, &id, bad.clone()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidRequest, "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_are_listed_found_by_tag_signalled_and_reattached() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let id = sandbox(&m, &a, &[]).await;
    let mut server = shell("echo first; sleep 0.5; echo later; sleep 30");
    server.tag = Some("server".into());
    let mut first = m.start_process(&a, &id, server).await.unwrap();
    let pid = first.info.pid;
    let ev = tokio::time::timeout(Duration::from_secs(10), first.events.recv()).await;
    assert_eq!(ev.unwrap(), Some(ProcessEvent::Stdout("first\n".into())));
    // The first reader goes away; the process keeps running.
    drop(first);
    let listed = m.list_processes(&a, &id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].pid, pid);
    assert_eq!(listed[0].tag.as_deref(), Some("server"));
    assert_eq!(listed[0].argv[..3], ["/bin/bash", "-l", "-c"]);

    let tag = ProcessSelector::Tag("server".into());
    let mut again = m.attach_process(&a, &id, &tag).await.unwrap();
    assert_eq!(again.info.pid, pid);
    let later = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = Vec::new();
        while let Some(ProcessEvent::Stdout(b)) = again.events.recv().await {
            seen.extend_from_slice(&b);
            if String::from_utf8_lossy(&seen).contains("later") {
                return String::from_utf8_lossy(&seen).into_owned();
            }
        }
        panic!("no later output");
    })
    .await
    .unwrap();
    assert!(
        !later.contains("first"),
        "a re-attached reader sees what comes next: {later}"
    );

    m.signal_process(&a, &id, &tag, 9).await.unwrap();
    let (_, _, end) = drain(again).await;
    assert_eq!((end.exit_code, end.signal), (-1, Some(9)));
    assert_eq!(end.status(), "signal: killed");
    // Gone from the list once ended.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !m.list_processes(&a, &id).await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let e = m.attach_process(&a, &id, &tag).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::ProcessNotFound);
    let e = m
        .signal_process(&a, &id, &ProcessSelector::Pid(pid), 15)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::ProcessNotFound);
    assert_eq!(
        m.signal_process(&a, &id, &tag, 0).await.unwrap_err().code(),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        m.signal_process(&a, &id, &tag, 65)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::InvalidRequest
    );

    // A process's own timeout kills it.
    let mut slow = shell("sleep 30");
    slow.timeout_s = Some(0.3);
    let (_, _, end) = drain(m.start_process(&a, &id, slow).await.unwrap()).await;
    assert!(end.timed_out);
    assert_eq!(end.signal, Some(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_reach_a_server_in_the_sandbox() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let id = sandbox(&m, &a, &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"pong").await.unwrap();
    });
    let (mut conn, _lease) = m.connect_port(&a, &id, port).await.unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "pong");
    // Nothing listens there now.
    let e = m.connect_port(&a, &id, port).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::PortUnreachable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_counts_processes() {
    let (m, _stats, _dir) = manager(Policy {
        executions_per_minute: Some(2),
        ..Policy::default()
    });
    let a = Caller::new("a");
    let id = sandbox(&m, &a, &[]).await;
    m.execute(&a, ExecuteCommand::new(Target::Id(id.clone()), "1"))
        .await
        .unwrap();
    drain(m.start_process(&a, &id, shell("true")).await.unwrap()).await;
    let e = m.start_process(&a, &id, shell("true")).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::RateLimited);
    let e = m
        .execute(&a, ExecuteCommand::new(Target::Id(id), "1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RateLimited);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_timeout_too_large_for_a_clock_is_no_timeout() {
    let (m, _stats, _dir) = manager(Policy::default());
    let a = Caller::new("a");
    let id = sandbox(&m, &a, &[]).await;
    let mut p = shell("echo ok");
    p.timeout_s = Some(1e300);
    let (out, _, end) = drain(m.start_process(&a, &id, p).await.unwrap()).await;
    assert_eq!((out.as_str(), end.exit_code), ("ok\n", 0));
}
