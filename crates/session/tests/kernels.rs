//! The kernels against the protocol, without a sandbox (no root needed): each kernel is started
//! directly from a temporary copy of its files, as the plug-in ships them, and every frame it
//! sends must decode as an `ampoule_protocol::Event`. The sandboxed behaviour is covered by
//! `tests/sessions`.

// The helpers of this file are test code too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use ampoule_protocol::{
    DoneStatus, Event, Execute, MAX_FRAME_BYTES, PROTOCOL_VERSION, Request, StreamName, decode,
    read_frame, write_message,
};
use ampoule_session::language;
use ampoule_types::Limits;

struct Kernel {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `name`'s kernel from a copy of its files; `None` when the runtime is missing.
fn start(name: &str) -> Option<Kernel> {
    start_with(name, &[])
}

/// [`start`], with `env` added after the plug-in's environment.
fn start_with(name: &str, env: &[(&str, &str)]) -> Option<Kernel> {
    let spec = match language::find(name).unwrap().locate(&Limits::default()) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("skipping {name}: {e}");
            return None;
        }
    };
    let dir = std::env::temp_dir().join(format!("ampoule-kernel-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in &spec.files {
        std::fs::write(dir.join(f.name), f.contents).unwrap();
    }
    let code_dir = dir.to_string_lossy().into_owned();
    let argv: Vec<String> = spec
        .argv
        .iter()
        .map(|a| a.replace("/run/ampoule", &code_dir))
        .collect();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(ampoule_runtime::language::base_env())
        .envs(spec.env.iter().cloned())
        .envs(env.iter().copied())
        .env("HOME", &dir)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    Some(Kernel {
        child,
        stdin: Some(stdin),
        stdout,
        _dir: TempDir(dir),
    })
}

impl Kernel {
    fn next(&mut self) -> Event {
        let payload = read_frame(&mut self.stdout, MAX_FRAME_BYTES)
            .unwrap()
            .expect("the kernel closed its event stream");
        decode(&payload).unwrap_or_else(|e| {
            panic!(
                "undecodable frame {:?}: {e}",
                String::from_utf8_lossy(&payload)
            )
        })
    }

    /// Runs code and returns its events, `done` last.
    fn execute(&mut self, id: &str, code: &str) -> Vec<Event> {
        self.execute_then(id, code, None)
    }

    /// Runs code, sending `then` (an interrupt) 100 ms after it, and returns its events.
    fn execute_then(&mut self, id: &str, code: &str, then: Option<Request>) -> Vec<Event> {
        let req = Request::Execute(Execute {
            id: id.into(),
            code: code.into(),
            inputs: None,
            timeout_s: None,
        });
        let stdin = self.stdin.as_mut().unwrap();
        write_message(stdin, &req).unwrap();
        stdin.flush().unwrap();
        if let Some(then) = then {
            // Late enough that the kernel has handed the cell to its runtime.
            std::thread::sleep(std::time::Duration::from_millis(100));
            write_message(stdin, &then).unwrap();
            stdin.flush().unwrap();
        }
        let mut events = Vec::new();
        loop {
            let ev = self.next();
            let done = matches!(ev, Event::Done { .. });
            assert_eq!(ev.id(), Some(id), "{ev:?}");
            events.push(ev);
            if done {
                return events;
            }
        }
    }
}

fn stdout_of(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Stream {
                name: StreamName::Stdout,
                text,
                ..
            } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn conversation(name: &str, print: &str, value: &str, want: &str) {
    let Some(mut k) = start(name) else { return };
    match k.next() {
        Event::Hello {
            protocol_version,
            language,
            ..
        } => {
            assert_eq!(protocol_version, PROTOCOL_VERSION);
            assert_eq!(language, name);
        }
        other => panic!("first frame was not hello: {other:?}"),
    }
    let events = k.execute("a", print);
    assert_eq!(stdout_of(&events), "hi\n", "{events:?}");
    assert!(matches!(
        events.last(),
        Some(Event::Done {
            status: DoneStatus::Ok,
            execution_count: 1,
            ..
        })
    ));
    let events = k.execute("b", value);
    let result = events.iter().find_map(|e| match e {
        Event::Result { data, .. } => data.get("text/plain").and_then(|v| v.as_str()),
        _ => None,
    });
    assert_eq!(result, Some(want), "{events:?}");
    // Closing the request stream ends the kernel.
    drop(k.stdin.take());
    assert!(k.child.wait().unwrap().success());
}

#[test]
fn python_kernel_speaks_the_protocol() {
    if !Path::new("/usr/bin/python3").exists() {
        eprintln!("skipping: no /usr/bin/python3");
        return;
    }
    conversation("python", "print('hi')", "6 * 7", "42");
}

#[test]
fn javascript_kernel_speaks_the_protocol() {
    conversation("javascript", "console.log('hi')", "6 * 7", "42");
}

/// An interrupt that arrives before the shell's bash has finished starting (a cell with a tiny
/// timeout, the first in a context, on a busy host) must not end the shell: the kernel says
/// hello only once a SIGINT can no longer kill bash. The main bash here starts 300 ms late, as
/// on a loaded machine; the version probe of the old kernel did not, so its hello came early.
#[test]
fn shell_survives_an_interrupt_right_after_its_hello() {
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow-bash");
    let Some(bash) = ["/usr/bin/bash", "/bin/bash"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("skipping: no bash");
        return;
    };
    std::fs::write(
        &slow,
        format!("#!/bin/sh\ncase \"$1\" in --noprofile) sleep 0.3;; esac\nexec {bash} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let slow = slow.to_string_lossy().into_owned();
    let Some(mut k) = start_with("shell", &[("AMPOULE_BASH", &slow)]) else {
        return;
    };
    assert!(matches!(k.next(), Event::Hello { .. }));
    let events = k.execute_then("a", "echo first", Some(Request::Interrupt));
    assert!(
        matches!(events.last(), Some(Event::Done { .. })),
        "{events:?}"
    );
    // The shell lives on, with its state.
    let events = k.execute("b", "x=42; echo alive $x");
    assert_eq!(stdout_of(&events), "alive 42\n", "{events:?}");
}

/// What the zygote's `immortalize` does, on every CPython this host has: on 3.12 and newer the
/// objects it held are immortal afterwards (a new reference leaves an object's count as it
/// was: nothing for a forked session to copy), and a socket it held stays mortal (dropping it
/// still closes its descriptor); before 3.12 it changes nothing. CI's Debian has 3.11 only;
/// hosts with a newer CPython (pyenv's, `/usr/bin/python3.12`…) run the other branch too.
#[test]
fn zygote_objects_become_immortal_on_cpython_3_12_and_newer() {
    let zygote = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels/python/zygote.py");
    let mut pythons: Vec<std::path::PathBuf> = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(String::from)
        .chain((12..=14).map(|m| format!("/usr/bin/python3.{m}")))
        .map(std::path::PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    if let Ok(dir) = std::fs::read_dir("/root/.pyenv/versions") {
        pythons.extend(
            dir.flatten()
                .map(|e| e.path().join("bin/python3"))
                .filter(|p| p.exists()),
        );
    }
    let script = r#"
import ctypes, gc, importlib.util, json, os, socket, sys
spec = importlib.util.spec_from_file_location("zygote", sys.argv[1])
z = importlib.util.module_from_spec(spec)
spec.loader.exec_module(z)
class Thing: pass
held = [Thing() for _ in range(10)]
sock = socket.socket(socket.AF_UNIX)
fd = sock.fileno()
gc.collect()
marked = z.immortalize()
count = lambda o: ctypes.c_uint32.from_address(id(o)).value
before = count(held[3])
more = [held[3]] * 100
unchanged = count(held[3]) == before
del sock
print(json.dumps({"version": list(sys.version_info[:2]), "marked": marked,
                  "unchanged": unchanged, "closed": not os.path.exists(f"/proc/self/fd/{fd}")}))
"#;
    let mut checked_new = false;
    for python in &pythons {
        let out = Command::new(python)
            .args(["-c", script])
            .arg(&zygote)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        if !out.status.success() {
            // A pyenv build without ctypes or sockets is no host runtime of ours.
            eprintln!(
                "{}: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let minor = v["version"][1].as_u64().unwrap();
        let major = v["version"][0].as_u64().unwrap();
        assert_eq!(v["closed"], true, "{}: {v}", python.display());
        if (major, minor) >= (3, 12) && minor < 15 {
            assert!(
                v["marked"].as_u64().unwrap() > 1000,
                "{}: {v}",
                python.display()
            );
            assert_eq!(v["unchanged"], true, "{}: {v}", python.display());
            checked_new = true;
        } else if (major, minor) < (3, 12) {
            assert_eq!(v["marked"], 0, "{}: {v}", python.display());
            assert_eq!(v["unchanged"], false, "{}: {v}", python.display());
        }
    }
    if !checked_new {
        eprintln!("no CPython 3.12+ here: only the older interpreters' branch was checked");
    }
}
