//! Entering a running sandbox: commands through `Entrance::spawn` share the kernel's sandbox
//! (files, pid namespace, ids, seals), TCP connections reach servers inside, and language
//! contexts run next to the default kernel. Each trial runs against a cold sandbox and a
//! zygote-born one.

use std::time::{Duration, Instant};

use ampoule_runtime::{EnterSpec, Entered, Entrance, Host, ProgramExit};
use ampoule_session::{Context, ExecuteRequest, Session, SessionState};
use ampoule_types::{ExecutionStatus, Limits};
use libtest_mimic::Failed;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Case, chain, check, run};

#[derive(Clone, Copy)]
enum Kind {
    Cold,
    Zygote,
}

/// A python session of `kind`, and the zygote that must outlive it.
async fn session(
    host: &Host,
    kind: Kind,
) -> Result<(Session, Option<ampoule_runtime::Zygote>), Failed> {
    match kind {
        Kind::Cold => Ok((crate::start(host, "python", Limits::default()).await?, None)),
        Kind::Zygote => {
            let z = ampoule_session::zygote::start_python(host, &[], 8)
                .await
                .map_err(|e| Failed::from(format!("starting the zygote: {}", chain(&e))))?;
            let s = Session::start_forked(host, &z, Limits::default())
                .await
                .map_err(|e| Failed::from(format!("forking a session: {}", chain(&e))))?;
            Ok((s, Some(z)))
        }
    }
}

fn entrance(s: &Session) -> Result<Entrance, Failed> {
    s.entrance()
        .ok_or_else(|| Failed::from("a live session has no entrance"))
}

fn sh_spec(script: &str) -> EnterSpec {
    EnterSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: ampoule_session::command_env(&[]),
        cwd: "/mnt/data".into(),
        stdin: false,
    }
}

async fn spawn(e: &Entrance, spec: &EnterSpec) -> Result<Entered, Failed> {
    e.spawn(spec)
        .await
        .map_err(|err| Failed::from(format!("spawning {:?}: {}", spec.argv, chain(&err))))
}

/// Runs a shell script to its end: (exit, stdout, stderr).
async fn sh(e: &Entrance, script: &str) -> Result<(ProgramExit, String, String), Failed> {
    let mut p = spawn(e, &sh_spec(script)).await?;
    let (mut out, mut err) = (String::new(), String::new());
    let (Some(mut so), Some(mut se)) = (p.stdout.take(), p.stderr.take()) else {
        return Err("no stdio pipes".into());
    };
    let io = async {
        let _ = tokio::join!(so.read_to_string(&mut out), se.read_to_string(&mut err));
    };
    tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .map_err(|_| Failed::from(format!("{script:?} did not end")))?;
    let exit = tokio::time::timeout(Duration::from_secs(10), p.wait())
        .await
        .map_err(|_| Failed::from("no exit status"))?
        .map_err(|e| Failed::from(chain(&e)))?;
    Ok((exit, out, err))
}

/// Files, pid namespace, ids, seals, network, exit codes and signals.
async fn commands_share_the_sandbox(host: Host, kind: Kind) -> Result<(), Failed> {
    let (mut s, _z) = session(&host, kind).await?;
    let out = run(
        &mut s,
        "import os\nopen('/mnt/data/from-kernel.txt','w').write('hello from the kernel')\nos.getpid()",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    let kernel_pid = out
        .result
        .as_ref()
        .and_then(|r| r.get("text/plain"))
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let e = entrance(&s)?;
    check!(e.alive(), "alive");

    let (exit, stdout, stderr) = sh(
        &e,
        "cat /mnt/data/from-kernel.txt; echo; id -u; id -g; \
         for p in /proc/[0-9]*; do echo \"$(cat $p/comm) [${p#/proc/}]\"; done; \
         if grep -a -q -e '--ent''er' /proc/[0-9]*/cmdline; then echo HELPER-VISIBLE; fi; \
         grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
         cat /proc/self/attr/current 2>/dev/null; \
         if touch /etc/x 2>/dev/null; then echo WROTE-ETC; fi; \
         if touch /usr/x 2>/dev/null; then echo WROTE-USR; fi; \
         if unshare -U true 2>/dev/null; then echo UNSHARED; fi; \
         mkdir -p /tmp/m; if mount -t tmpfs none /tmp/m 2>/dev/null; then echo MOUNTED; fi; \
         tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; \
         echo cwd=$(pwd) home=$HOME; \
         exit 7",
    )
    .await?;
    let all = format!("{stdout}\n--- stderr\n{stderr}");
    check!(exit == ProgramExit::Exited(7), (exit, &all));
    check!(
        stdout.starts_with("hello from the kernel\n1000\n1000\n"),
        all
    );
    // Same pid namespace: the kernel (by the pid it reported) is there, and so is pid 1.
    check!(
        stdout.contains(&format!("[{kernel_pid}]")) && stdout.contains("[1]"),
        (&kernel_pid, &all)
    );
    // The helper is outside: no process of the sandbox is ampoule's `--enter` helper.
    check!(!stdout.contains("HELPER-VISIBLE"), all);
    check!(stdout.contains("CapEff:\t0000000000000000"), all);
    check!(stdout.contains("CapBnd:\t0000000000000000"), all);
    check!(stdout.contains("NoNewPrivs:\t1"), all);
    check!(stdout.contains("Seccomp:\t2"), all);
    for bad in ["WROTE-ETC", "WROTE-USR", "UNSHARED", "MOUNTED"] {
        check!(!stdout.contains(bad), (bad, &all));
    }
    let ifaces: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Seccomp"))
        .skip(1)
        .take_while(|l| !l.starts_with("cwd="))
        .collect();
    check!(ifaces == ["lo"], (ifaces, &all));
    check!(stdout.contains("cwd=/mnt/data home=/mnt/data"), all);

    // A command's own file is the kernel's too.
    let (exit, _, _) = sh(&e, "echo from-command > /mnt/data/from-command.txt").await?;
    check!(exit == ProgramExit::Exited(0), exit);
    let out = run(&mut s, "open('/mnt/data/from-command.txt').read().strip()").await?;
    check!(
        out.result
            .as_ref()
            .and_then(|r| r.get("text/plain"))
            .is_some_and(|v| v.as_str() == Some("'from-command'")),
        out
    );

    // Signals: a plain signal, and a kill of the whole group.
    let p = spawn(&e, &sh_spec("exec sleep 100")).await?;
    let mut p = p;
    p.signal(nix::libc::SIGTERM)
        .map_err(|e| Failed::from(chain(&e)))?;
    let exit = tokio::time::timeout(Duration::from_secs(10), p.wait()).await;
    check!(
        matches!(exit, Ok(Ok(ProgramExit::Signaled(nix::libc::SIGTERM)))),
        exit
    );
    let mut p = spawn(&e, &sh_spec("sleep 100 & sleep 100; echo never")).await?;
    p.kill();
    let exit = tokio::time::timeout(Duration::from_secs(10), p.wait()).await;
    check!(
        matches!(exit, Ok(Ok(ProgramExit::Signaled(nix::libc::SIGKILL)))),
        exit
    );
    // The group went with it: no sleep left.
    let (_, stdout, _) = sh(&e, "cat /proc/[0-9]*/comm").await?;
    check!(!stdout.contains("sleep"), stdout);

    // A missing program is an error, not a hang.
    let missing = e
        .spawn(&EnterSpec {
            argv: vec!["/nonexistent".into()],
            ..sh_spec("")
        })
        .await;
    check!(
        matches!(&missing, Err(ampoule_runtime::Error::Setup { stage, .. }) if stage == "exec"),
        missing
    );
    s.close().await;
    Ok(())
}

/// A background command runs on between executions; killing the sandbox kills it.
async fn background_and_teardown(host: Host, kind: Kind) -> Result<(), Failed> {
    let (mut s, _z) = session(&host, kind).await?;
    let e = entrance(&s)?;
    let mut bg = spawn(&e, &sh_spec("echo started > /tmp/bg; exec sleep 300")).await?;
    let pid = bg.pid;
    for _ in 0..2 {
        let out = run(&mut s, &format!("import os, time\ntime.sleep(0.2)\nos.path.exists('/proc/{pid}') and open('/proc/{pid}/comm').read().strip()")).await?;
        check!(
            out.result
                .as_ref()
                .and_then(|r| r.get("text/plain"))
                .is_some_and(|v| v.as_str() == Some("'sleep'")),
            out
        );
    }
    check!(
        tokio::time::timeout(Duration::from_millis(100), bg.wait())
            .await
            .is_err(),
        "the background command ended"
    );
    s.close().await;
    let exit = tokio::time::timeout(Duration::from_secs(10), bg.wait()).await;
    check!(
        matches!(
            exit,
            Ok(Ok(
                ProgramExit::Signaled(nix::libc::SIGKILL) | ProgramExit::Killed
            ))
        ),
        exit
    );
    check!(!e.alive(), "an entrance of a closed session is alive");
    check!(
        e.spawn(&sh_spec("true")).await.is_err(),
        "spawned after the end"
    );
    Ok(())
}

/// `connect_tcp` reaches a server started inside; a closed port is a quick error.
async fn tcp_into_the_sandbox(host: Host, kind: Kind) -> Result<(), Failed> {
    let (s, _z) = session(&host, kind).await?;
    let e = entrance(&s)?;
    let _server = spawn(
        &e,
        &EnterSpec {
            argv: vec![
                "/usr/bin/python3".into(),
                "-m".into(),
                "http.server".into(),
                "8765".into(),
                "--bind".into(),
                "127.0.0.1".into(),
            ],
            ..sh_spec("")
        },
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut conn = loop {
        match e.connect_tcp(8765).await {
            Ok(c) => break c,
            Err(err) if Instant::now() > deadline => {
                return Err(format!("never connected: {}", chain(&err)).into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    conn.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut reply))
        .await
        .map_err(|_| "no reply")?
        .map_err(|e| e.to_string())?;
    check!(reply.starts_with("HTTP/1.0 200"), reply);
    let t = Instant::now();
    let closed = e.connect_tcp(8766).await;
    check!(
        closed.is_err() && t.elapsed() < Duration::from_secs(5),
        (closed, t.elapsed())
    );
    s.close().await;
    Ok(())
}

/// Contexts of other languages share the files; a context's timeout kills only the context.
async fn contexts(host: Host, kind: Kind) -> Result<(), Failed> {
    let (mut s, _z) = session(&host, kind).await?;
    let e = entrance(&s)?;
    run(
        &mut s,
        "open('/mnt/data/shared.txt','w').write('from python')",
    )
    .await?;
    let mut js = Context::start(&e, "js", Limits::default(), None, &[])
        .await
        .map_err(|e| Failed::from(format!("javascript context: {}", chain(&e))))?;
    check!(js.language() == "javascript", js.language());
    let out = js
        .execute(ExecuteRequest::new(
            "const fs = require('fs'); fs.writeFileSync('/mnt/data/js.txt', 'from js'); fs.readFileSync('/mnt/data/shared.txt', 'utf8')",
        ))
        .await
        .map_err(|e| Failed::from(chain(&e)))?;
    check!(format!("{:?}", out.result).contains("from python"), out);
    let mut shell = Context::start(&e, "bash", Limits::default(), Some("/tmp"), &[])
        .await
        .map_err(|e| Failed::from(format!("shell context: {}", chain(&e))))?;
    let out = shell
        .execute(ExecuteRequest::new("pwd; cat /mnt/data/js.txt; echo; X=5"))
        .await
        .map_err(|e| Failed::from(chain(&e)))?;
    check!(out.stdout.contains("/tmp\nfrom js"), out);
    // A timeout in the shell context: interrupted, state kept, the others untouched.
    let out = shell
        .execute(ExecuteRequest::new("sleep 30").timeout(1.0))
        .await
        .map_err(|e| Failed::from(chain(&e)))?;
    check!(out.status == ExecutionStatus::TimedOut, out);
    // JavaScript code that ignores the interrupt: the context is killed, nothing else.
    js.set_interrupt_grace(Duration::from_millis(500));
    let out = js
        .execute(ExecuteRequest::new("while (true) {}").timeout(1.0))
        .await
        .map_err(|e| Failed::from(chain(&e)))?;
    check!(out.status == ExecutionStatus::TimedOut, out);
    if out.session_state == SessionState::Lost {
        check!(!js.is_alive(), "a lost context is alive");
    }
    let out = shell
        .execute(ExecuteRequest::new("echo $X"))
        .await
        .map_err(|e| Failed::from(chain(&e)))?;
    check!(out.stdout.trim() == "5", out);
    let out = run(&mut s, "open('/mnt/data/js.txt').read()").await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(s.is_alive(), "the session died with a context");
    js.close().await;
    shell.close().await;
    let out = run(&mut s, "1 + 1").await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    s.close().await;
    Ok(())
}

pub(crate) fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (kind, tag) in [(Kind::Cold, "cold"), (Kind::Zygote, "zygote")] {
        cases.push(Case::new(
            "python",
            &format!("enter_{tag}_commands_share_the_sandbox"),
            move |h| commands_share_the_sandbox(h, kind),
        ));
        cases.push(Case::new(
            "python",
            &format!("enter_{tag}_background_and_teardown"),
            move |h| background_and_teardown(h, kind),
        ));
        cases.push(Case::new(
            "python",
            &format!("enter_{tag}_tcp_into_the_sandbox"),
            move |h| tcp_into_the_sandbox(h, kind),
        ));
        cases.push(Case::new(
            "python",
            &format!("enter_{tag}_contexts"),
            move |h| contexts(h, kind),
        ));
    }
    cases
}
