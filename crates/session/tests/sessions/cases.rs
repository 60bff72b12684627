//! The trials: the same behaviours for every language, then language-specific ones.

use std::time::{Duration, Instant};

use ampoule_runtime::Host;
use ampoule_session::{ExecuteRequest, ExecutionEvent, ExecutionResult, SessionState};
use ampoule_types::{ExecutionStatus, LimitKind, Limits};
use base64::Engine;
use libtest_mimic::Failed;

use crate::{Case, check, run, run_req, start};

/// What an execution must show.
#[derive(Clone, Copy)]
enum Expect {
    /// The last expression's `text/plain`.
    Result(&'static str),
    /// Standard output.
    Stdout(&'static str),
}

impl Expect {
    fn holds(self, out: &ExecutionResult) -> bool {
        match self {
            Expect::Result(text) => text_plain(out).as_deref() == Some(text),
            Expect::Stdout(text) => out.stdout == text,
        }
    }
}

/// The per-language snippets of the common behaviours.
struct Lang {
    name: &'static str,
    /// Three executions that build on each other, and what the third shows.
    state: [&'static str; 3],
    state_expect: Expect,
    /// An expression and its `text/plain` (languages with values).
    value: Option<(&'static str, &'static str)>,
    /// Writes "out" to stdout and "err" to stderr.
    streams: &'static str,
    /// Fails, with this name, a value containing this, and a traceback containing this.
    error: (&'static str, &'static str, &'static str, &'static str),
    /// Remembers "kept", then spins forever, then shows what it remembered.
    remember: &'static str,
    spin: &'static str,
    recall: (&'static str, Expect),
}

const LANGS: &[Lang] = &[
    Lang {
        name: "python",
        state: ["x = 1", "x += 41", "x"],
        state_expect: Expect::Result("42"),
        value: Some(("6 * 7", "42")),
        streams: "import sys\nprint('out')\nprint('err', file=sys.stderr)",
        error: (
            "def f():\n    return 1 / 0\nf()",
            "ZeroDivisionError",
            "division by zero",
            "<cell 1>\", line 2, in f",
        ),
        remember: "y = 'kept'",
        spin: "import time\nwhile True:\n    time.sleep(0.05)",
        recall: ("y", Expect::Result("'kept'")),
    },
    Lang {
        name: "javascript",
        state: ["let x = 1", "x += 41", "x"],
        state_expect: Expect::Result("42"),
        value: Some(("6 * 7", "42")),
        streams: "console.log('out'); console.error('err')",
        error: (
            "function f() {\n  throw new TypeError('bad');\n}\nf()",
            "TypeError",
            "bad",
            "at f (cell-1:2:9)",
        ),
        remember: "const y = 'kept'",
        spin: "while (true) {}",
        recall: ("y", Expect::Result("'kept'")),
    },
    Lang {
        name: "shell",
        state: ["x=1; cd /tmp", "export X=$((x + 41))", "echo $X $(pwd)"],
        state_expect: Expect::Stdout("42 /tmp\n"),
        value: None,
        streams: "echo out; echo err >&2",
        error: (
            "nosuchcommand",
            "ExitStatus",
            "exit status 127",
            "nosuchcommand: command not found",
        ),
        remember: "f() { echo kept; }",
        spin: "sleep 1000",
        recall: ("f", Expect::Stdout("kept\n")),
    },
    Lang {
        name: "csharp",
        state: ["var x = 1;", "x += 41;", "x"],
        state_expect: Expect::Result("42"),
        value: Some(("6 * 7", "42")),
        streams: "Console.WriteLine(\"out\"); Console.Error.WriteLine(\"err\");",
        error: (
            "throw new InvalidOperationException(\"bad\");",
            "InvalidOperationException",
            "bad",
            "System.InvalidOperationException: bad",
        ),
        remember: "var y = \"kept\";",
        spin: "while (true) {}",
        recall: ("y", Expect::Result("\"kept\"")),
    },
    Lang {
        name: "powershell",
        state: ["$x = 1", "$x += 41", "$x"],
        state_expect: Expect::Stdout("42\n"),
        value: None,
        streams: "Write-Output 'out'; [Console]::Error.WriteLine('err')",
        error: (
            "throw [System.InvalidOperationException]::new('bad')",
            "InvalidOperationException",
            "bad",
            "bad",
        ),
        remember: "$y = 'kept'",
        spin: "while ($true) { Start-Sleep -Milliseconds 50 }",
        recall: ("$y", Expect::Stdout("kept\n")),
    },
];

pub(crate) fn text_plain(out: &ExecutionResult) -> Option<String> {
    out.result
        .as_ref()
        .and_then(|r| r.get("text/plain"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

fn quick() -> Limits {
    Limits {
        timeout_s: 60.0,
        ..Limits::default()
    }
}

pub(crate) fn all() -> Vec<Case> {
    let mut cases = Vec::new();
    for lang in LANGS {
        cases.push(Case::new(
            lang.name,
            "state_persists_across_three_executions",
            move |host| state_persists(host, lang),
        ));
        if let Some((code, text)) = lang.value {
            cases.push(Case::new(lang.name, "last_expression_value", move |host| {
                last_value(host, lang.name, code, text)
            }));
        }
        cases.push(Case::new(
            lang.name,
            "stdout_and_stderr_are_separate",
            move |host| streams(host, lang),
        ));
        cases.push(Case::new(
            lang.name,
            "error_has_name_value_and_traceback",
            move |host| error(host, lang),
        ));
        cases.push(Case::new(
            lang.name,
            "timeout_interrupts_and_keeps_state",
            move |host| timeout(host, lang),
        ));
    }
    cases.push(Case::new("python", "matplotlib_plot_is_a_valid_png", plot).needs_packages());
    cases.push(Case::new("python", "dataframe_as_text_and_html", dataframe).needs_packages());
    cases.push(Case::new("python", "rich_reprs_and_display", rich));
    cases.push(Case::new("python", "inputs_and_json_results", inputs));
    cases.push(Case::new(
        "python",
        "output_streams_while_running",
        streaming,
    ));
    cases.push(Case::new(
        "python",
        "output_cap_stops_the_code_and_keeps_state",
        output_cap,
    ));
    cases.push(Case::new(
        "python",
        "ignored_interrupt_is_killed_and_lost",
        unresponsive,
    ));
    cases.push(Case::new("python", "exiting_interpreter_is_lost", exiting));
    cases.push(Case::new(
        "python",
        "top_level_await_alone_and_after_statements",
        py_await,
    ));
    cases.push(Case::new("python", "pip_installs_an_uploaded_wheel", wheel).needs_packages());
    cases.push(Case::new(
        "javascript",
        "top_level_await_and_redeclaration",
        js_await,
    ));
    cases.push(Case::new(
        "javascript",
        "awaiting_code_is_interrupted",
        js_await_interrupt,
    ));
    cases.push(Case::new("shell", "exit_status_is_returned", shell_status));
    cases.push(Case::new(
        "python",
        "memory_limit_kills_and_loses_state",
        memory,
    ));
    cases.push(Case::new("python", "setup_is_idempotent", setup_again).needs_packages());
    cases
}

async fn state_persists(host: Host, lang: &'static Lang) -> Result<(), Failed> {
    let mut s = start(&host, lang.name, quick()).await?;
    let mut last = None;
    for code in lang.state {
        let out = run(&mut s, code).await?;
        check!(out.status == ExecutionStatus::Succeeded, out);
        last = Some(out);
    }
    let out = last.ok_or("no execution")?;
    check!(lang.state_expect.holds(&out), out);
    check!(out.execution_count == Some(3), out);
    Ok(())
}

/// A cell that is only an awaited expression (the kernel compiles it once, without an empty
/// module before it) and one whose statements await before its last expression.
async fn py_await(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    for (code, want) in [
        ("import asyncio\nawait asyncio.sleep(0, result=42)", "42"),
        ("await asyncio.sleep(0, result=21)", "21"),
        ("x = await asyncio.sleep(0, result=7)\nx * 6", "42"),
        ("6 * 7", "42"),
    ] {
        let out = run(&mut s, code).await?;
        check!(out.status == ExecutionStatus::Succeeded, out);
        check!(text_plain(&out).as_deref() == Some(want), (code, out));
    }
    Ok(())
}

async fn last_value(
    host: Host,
    language: &'static str,
    code: &'static str,
    text: &'static str,
) -> Result<(), Failed> {
    let mut s = start(&host, language, quick()).await?;
    let out = run(&mut s, code).await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(text_plain(&out).as_deref() == Some(text), out);
    if language != "csharp" {
        let json = out.result.as_ref().and_then(|r| r.get("application/json"));
        check!(json == Some(&serde_json::json!(42)), out);
    }
    Ok(())
}

async fn streams(host: Host, lang: &'static Lang) -> Result<(), Failed> {
    let mut s = start(&host, lang.name, quick()).await?;
    let out = run(&mut s, lang.streams).await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(out.stdout == "out\n", out);
    check!(out.stderr == "err\n", out);
    Ok(())
}

async fn error(host: Host, lang: &'static Lang) -> Result<(), Failed> {
    let (code, ename, evalue, traceback) = lang.error;
    let mut s = start(&host, lang.name, quick()).await?;
    let out = run(&mut s, code).await?;
    check!(out.status == ExecutionStatus::Failed, out);
    check!(out.session_state == SessionState::Kept, out);
    let err = out
        .error
        .as_ref()
        .ok_or_else(|| format!("no error: {out:#?}"))?;
    check!(err.name == ename, out);
    check!(err.value.contains(evalue), out);
    let tb = err.traceback.join("\n");
    check!(tb.contains(traceback), out);
    // The traceback points at the user's code, never at the kernel's.
    check!(!tb.contains("kernel.py") && !tb.contains("kernel.js"), out);
    Ok(())
}

async fn timeout(host: Host, lang: &'static Lang) -> Result<(), Failed> {
    let mut s = start(&host, lang.name, quick()).await?;
    let out = run(&mut s, lang.remember).await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    let started = Instant::now();
    let out = run_req(&mut s, ExecuteRequest::new(lang.spin).timeout(1.0)).await?;
    check!(out.status == ExecutionStatus::TimedOut, out);
    check!(out.limit == Some(LimitKind::Time), out);
    check!(out.session_state == SessionState::Kept, out);
    check!(started.elapsed() < Duration::from_secs(4), out);
    let (code, expect) = lang.recall;
    let out = run(&mut s, code).await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(expect.holds(&out), out);
    Ok(())
}

fn png_of(bundle: &ampoule_session::MimeBundle) -> Result<(u32, u32), Failed> {
    let b64 = bundle
        .get("image/png")
        .and_then(|v| v.as_str())
        .ok_or("no image/png")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("image/png is not base64: {e}"))?;
    let decoder = png::Decoder::new(bytes.as_slice());
    let mut reader = decoder.read_info().map_err(|e| format!("not a PNG: {e}"))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("PNG does not decode: {e}"))?;
    Ok((info.width, info.height))
}

async fn plot(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    // plt.show() sends the figure at once.
    let out = run(
        &mut s,
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(out.outputs.len() == 1, out);
    let (w, h) = png_of(&out.outputs[0])?;
    check!(w > 100 && h > 100, (w, h));
    // A figure left open is sent when the execution ends.
    let out = run(
        &mut s,
        "fig, ax = plt.subplots()\nax.bar(['a', 'b'], [3, 5])\nNone",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(out.outputs.len() == 1, out);
    png_of(&out.outputs[0])?;
    // ...and only once.
    let out = run(&mut s, "1").await?;
    check!(out.outputs.is_empty(), out);
    Ok(())
}

async fn dataframe(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    let out = run(
        &mut s,
        "import pandas as pd\ndf = pd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [3.5, 19.0]})\ndf",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    let result = out.result.as_ref().ok_or("no result")?;
    let text = result
        .get("text/plain")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let html = result
        .get("text/html")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    check!(
        text.contains("city") && text.contains("Oslo") && text.contains("19.0"),
        out
    );
    check!(
        html.contains("<table") && html.contains("<td>Lima</td>"),
        out
    );
    Ok(())
}

async fn rich(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    let out = run(
        &mut s,
        "class Card:\n    def _repr_html_(self): return '<b>card</b>'\n    def _repr_markdown_(self): return '**card**'\n    def _repr_svg_(self): return '<svg/>'\n    def __repr__(self): return 'Card()'\nprint('before')\ndisplay(Card())\nCard()",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(out.stdout == "before\n", out);
    check!(out.outputs.len() == 1, out);
    let d = &out.outputs[0];
    check!(
        d.get("text/html") == Some(&serde_json::json!("<b>card</b>")),
        out
    );
    check!(
        d.get("text/markdown") == Some(&serde_json::json!("**card**")),
        out
    );
    check!(
        d.get("image/svg+xml") == Some(&serde_json::json!("<svg/>")),
        out
    );
    check!(text_plain(&out).as_deref() == Some("Card()"), out);
    Ok(())
}

async fn inputs(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    let mut map = serde_json::Map::new();
    map.insert("n".into(), serde_json::json!(20));
    let out = run_req(
        &mut s,
        ExecuteRequest::new("{'double': inputs['n'] * 2, 'items': [1, None, 'a']}").inputs(map),
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    let json = out.result.as_ref().and_then(|r| r.get("application/json"));
    check!(
        json == Some(&serde_json::json!({"double": 40, "items": [1, null, "a"]})),
        out
    );
    // A value that is not plain JSON has text only.
    let out = run(&mut s, "(1, 2)").await?;
    check!(
        out.result
            .as_ref()
            .is_some_and(|r| !r.contains_key("application/json")),
        out
    );
    Ok(())
}

async fn streaming(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    let started = Instant::now();
    let mut seen: Vec<(Duration, ExecutionEvent)> = Vec::new();
    let out = s
        .execute_streaming(
            ExecuteRequest::new(
                "import time, os\nfor i in range(3):\n    print(i)\n    time.sleep(0.4)\nos.system('echo from-a-child >&2')",
            ),
            |o| seen.push((started.elapsed(), o)),
        )
        .await
        .map_err(|e| crate::chain(&e))?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(out.stdout == "0\n1\n2\n", out);
    check!(out.stderr == "from-a-child\n", out);
    let first = seen.first().ok_or("nothing streamed")?;
    check!(
        matches!(&first.1, ExecutionEvent::Stdout { text } if text.starts_with('0')),
        seen
    );
    // The first line arrived long before the execution ended.
    check!(
        first.0 + Duration::from_millis(700) < started.elapsed(),
        seen
    );
    Ok(())
}

async fn output_cap(host: Host) -> Result<(), Failed> {
    let limits = Limits {
        output_bytes: 10_000,
        ..quick()
    };
    let mut s = start(&host, "python", limits).await?;
    run(&mut s, "z = 'kept'").await?;
    let out = run(&mut s, "while True:\n    print('x' * 99)").await?;
    check!(out.status == ExecutionStatus::Killed, out);
    check!(out.limit == Some(LimitKind::Output), out);
    check!(out.stdout_truncated && out.stdout.len() == 10_000, out);
    check!(out.session_state == SessionState::Kept, out);
    let out = run(&mut s, "z").await?;
    check!(text_plain(&out).as_deref() == Some("'kept'"), out);
    check!(!out.stdout_truncated, out);
    Ok(())
}

async fn unresponsive(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    s.set_interrupt_grace(Duration::from_millis(500));
    let out = run_req(
        &mut s,
        ExecuteRequest::new(
            "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.05)",
        )
        .timeout(0.5),
    )
    .await?;
    check!(out.status == ExecutionStatus::TimedOut, out);
    check!(out.session_state == SessionState::Lost, out);
    check!(!s.is_alive(), out);
    match s.execute(ExecuteRequest::new("1")).await {
        Err(ampoule_session::Error::Lost(_)) => Ok(()),
        other => Err(format!("a lost session answered {other:?}").into()),
    }
}

async fn exiting(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    let out = run(&mut s, "import os\nos._exit(3)").await?;
    check!(out.status == ExecutionStatus::Failed, out);
    check!(out.session_state == SessionState::Lost, out);
    let err = out.error.as_ref().ok_or("no error")?;
    check!(
        err.name == "KernelDied" && err.value.contains("status 3"),
        out
    );
    // sys.exit() is an exception like any other: the session survives it.
    let mut s = start(&host, "python", quick()).await?;
    let out = run(&mut s, "v = 1\nraise SystemExit(2)").await?;
    check!(
        out.status == ExecutionStatus::Failed && out.session_state == SessionState::Kept,
        out
    );
    let out = run(&mut s, "v").await?;
    check!(text_plain(&out).as_deref() == Some("1"), out);
    check!(s.is_alive(), out);
    // An interpreter that dies between executions is noticed without another call (the
    // server's reaper asks `is_alive` to drop such sessions from its pools).
    let out = run(
        &mut s,
        "import os, threading, time\n\
         threading.Thread(target=lambda: (time.sleep(0.3), os._exit(0))).start()",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.is_alive() {
        if std::time::Instant::now() > deadline {
            return Err("a kernel that exited between executions still counts as alive".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn wheel(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "python", quick()).await?;
    // Build a tiny wheel inside the sandbox (an uploaded file would sit in /mnt/data too).
    let out = run(
        &mut s,
        r#"import zipfile, base64, hashlib
name, files = "ampoule_demo-1.0", {
    "ampoule_demo/__init__.py": b"ANSWER = 42\n",
    "ampoule_demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: ampoule-demo\nVersion: 1.0\n",
    "ampoule_demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = ""
with zipfile.ZipFile("/mnt/data/ampoule_demo-1.0-py3-none-any.whl", "w") as z:
    for path, data in files.items():
        z.writestr(path, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += "ampoule_demo-1.0.dist-info/RECORD,,\n"
    z.writestr("ampoule_demo-1.0.dist-info/RECORD", record)"#,
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    let out = run(
        &mut s,
        "%pip install --no-index /mnt/data/ampoule_demo-1.0-py3-none-any.whl\nimport ampoule_demo\nampoule_demo.ANSWER",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    check!(text_plain(&out).as_deref() == Some("42"), out);
    check!(
        out.stdout
            .contains("Successfully installed ampoule-demo-1.0"),
        out
    );
    Ok(())
}

async fn js_await(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "javascript", quick()).await?;
    let out = run(
        &mut s,
        "const v = await new Promise(r => setTimeout(() => r(21), 50)); v * 2",
    )
    .await?;
    check!(text_plain(&out).as_deref() == Some("42"), out);
    // Declaring again replaces, as in a browser console.
    let out = run(&mut s, "const v = 'again'; v").await?;
    check!(text_plain(&out).as_deref() == Some("'again'"), out);
    let out = run(&mut s, "({a: [1, 2], b: null})").await?;
    let json = out.result.as_ref().and_then(|r| r.get("application/json"));
    check!(
        json == Some(&serde_json::json!({"a": [1, 2], "b": null})),
        out
    );
    let out = run(
        &mut s,
        "require('child_process').execSync('echo child >&2', {stdio: 'inherit'}); undefined",
    )
    .await?;
    check!(out.stderr == "child\n" && out.result.is_none(), out);
    Ok(())
}

async fn js_await_interrupt(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "javascript", quick()).await?;
    run(&mut s, "let n = 7").await?;
    let out = run_req(
        &mut s,
        ExecuteRequest::new("await new Promise(() => {})").timeout(0.5),
    )
    .await?;
    check!(
        out.status == ExecutionStatus::TimedOut && out.session_state == SessionState::Kept,
        out
    );
    let out = run(&mut s, "n").await?;
    check!(text_plain(&out).as_deref() == Some("7"), out);
    Ok(())
}

async fn shell_status(host: Host) -> Result<(), Failed> {
    let mut s = start(&host, "shell", quick()).await?;
    let out = run(&mut s, "echo fine").await?;
    check!(
        out.status == ExecutionStatus::Succeeded && out.exit_code == Some(0),
        out
    );
    let out = run(&mut s, "(exit 3)").await?;
    check!(
        out.status == ExecutionStatus::Failed && out.exit_code == Some(3),
        out
    );
    let mut map = serde_json::Map::new();
    map.insert("k".into(), serde_json::json!("v"));
    let out = run_req(
        &mut s,
        ExecuteRequest::new("echo \"$AMPOULE_INPUTS\"").inputs(map),
    )
    .await?;
    check!(out.stdout == "{\"k\": \"v\"}\n", out);
    // `exit` ends the shell: reported, and the session is lost.
    let out = run(&mut s, "exit 4").await?;
    check!(
        out.status == ExecutionStatus::Failed && out.session_state == SessionState::Lost,
        out
    );
    Ok(())
}

async fn memory(host: Host) -> Result<(), Failed> {
    if host.cgroups.is_none() {
        eprintln!(
            "python/memory_limit_kills_and_loses_state: no cgroups here, nothing enforces memory"
        );
        return Ok(());
    }
    let limits = Limits {
        memory_mib: 128,
        ..quick()
    };
    let mut s = start(&host, "python", limits).await?;
    let out = run(&mut s, "hog = b'x' * (600 * 1024 * 1024)").await?;
    check!(out.status == ExecutionStatus::Killed, out);
    check!(out.limit == Some(LimitKind::Memory), out);
    check!(out.session_state == SessionState::Lost, out);
    Ok(())
}

async fn setup_again(_host: Host) -> Result<(), Failed> {
    use ampoule_session::setup::{PythonEnv, SetupOutcome, setup_python};
    let env = PythonEnv::default_location();
    let started = Instant::now();
    let mut events = Vec::new();
    // With the interpreter the environment was built with (`ampoule setup --python` may have
    // named another than the host's python3; asking for a different one is refused).
    let base = env
        .base_interpreter()
        .unwrap_or_else(|| "/usr/bin/python3".into());
    let outcome =
        setup_python(&env, &base, &mut |e| events.push(e)).map_err(|e| crate::chain(&e))?;
    check!(
        outcome == SetupOutcome::UpToDate && events.is_empty(),
        (outcome, events)
    );
    check!(
        started.elapsed() < Duration::from_secs(10),
        started.elapsed()
    );
    check!(
        env.outdated().map_err(|e| crate::chain(&e))?.is_empty(),
        env
    );
    Ok(())
}
