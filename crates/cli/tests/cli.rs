#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed unwrap is a failed test"
)]
//! `ampoule run` and `ampoule doctor` as a user calls them: exit codes, inputs and outputs,
//! JSON results, clear errors for bad input, and the orphan sweep after a killed supervisor.
//!
//! Most of these tests start real sandboxes, so they need root (as CI has); without it they are
//! reported as ignored, with the reason.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ampoule_testkit::host::{is_root, trial};
use libtest_mimic::Arguments;

fn ampoule() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ampoule"))
}

fn run_stdin(args: &[&str], code: &str) -> Output {
    let mut child = ampoule()
        .arg("run")
        .args(args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(code.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn prints_output_and_returns_the_programs_exit_code() {
    let out = run_stdin(
        &[],
        "import sys\nprint(1)\nprint('err', file=sys.stderr)\nsys.exit(3)\n",
    );
    assert_eq!(text(&out.stdout), "1\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(3));
}

fn every_language_runs() {
    let out = run_stdin(&["--lang", "javascript"], "console.log(6 * 7)");
    assert_eq!(text(&out.stdout), "42\n", "{}", text(&out.stderr));
    let out = run_stdin(&["--lang", "bash"], "echo $((6 * 7)); exit 4");
    assert_eq!(text(&out.stdout), "42\n");
    assert_eq!(out.status.code(), Some(4));
}

/// The host's public `/etc` files reach the code unchanged, whether bound (larger ones) or
/// copied into the root's tmpfs (small ones), and neither kind can be written.
fn public_etc_files_match_the_host_and_are_read_only() {
    let names = [
        "services",
        "protocols",
        "ssl/openssl.cnf",
        "ld.so.conf",
        "ca-certificates.conf",
        "ld.so.cache",
        "mime.types",
    ];
    let present: Vec<&str> = names
        .into_iter()
        .filter(|n| std::path::Path::new("/etc").join(n).is_file())
        .collect();
    assert!(
        present.contains(&"services"),
        "this host has no /etc/services"
    );
    let code = format!(
        "import hashlib, os\n\
         for n in {present:?}:\n\
         \x20   p = '/etc/' + n\n\
         \x20   print(n, hashlib.sha256(open(p, 'rb').read()).hexdigest())\n\
         \x20   try:\n\
         \x20       open(p, 'ab').write(b'x')\n\
         \x20       print('WROTE', n)\n\
         \x20   except OSError:\n\
         \x20       pass\n"
    );
    let out = run_stdin(&[], &code);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let want: String = present
        .iter()
        .map(|n| {
            let bytes = std::fs::read(std::path::Path::new("/etc").join(n)).unwrap();
            format!("{n} {}\n", sha256_hex(&bytes))
        })
        .collect();
    assert_eq!(text(&out.stdout), want);
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn code_from_a_file_inputs_in_and_outputs_out() {
    let dir = tempfile::tempdir().unwrap();
    let code = dir.path().join("job.py");
    std::fs::write(
        &code,
        "import os\n\
         data = open('input.csv').read()\n\
         os.makedirs('reports', exist_ok=True)\n\
         open('reports/summary.txt', 'w').write(data.upper())\n\
         os.symlink('/etc/hostname', 'link')\n\
         print(sorted(os.listdir('.')))\n",
    )
    .unwrap();
    let input = dir.path().join("input.csv");
    std::fs::write(&input, "a,b\n1,2\n").unwrap();
    let out_dir = dir.path().join("out");
    let out = ampoule()
        .args(["run", "--json", "--file"])
        .arg(&input)
        .arg("--out")
        .arg(&out_dir)
        .arg(&code)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["stdout"], "['input.csv', 'link', 'reports']\n");
    let files: Vec<&str> = r["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec!["input.csv", "reports/summary.txt"]);
    assert_eq!(
        std::fs::read_to_string(out_dir.join("reports/summary.txt")).unwrap(),
        "A,B\n1,2\n"
    );
    // The symlink the code planted is neither listed nor followed.
    assert!(!out_dir.join("link").exists());
}

fn json_result_reports_the_limit_that_decided() {
    let out = run_stdin(
        &["--json", "--timeout", "0.5"],
        "import time\nprint('before', flush=True)\ntime.sleep(10)\n",
    );
    assert_eq!(out.status.code(), Some(124));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "timed_out");
    assert_eq!(r["limit"], "time");
    assert_eq!(r["stdout"], "before\n");
    assert!(r["duration_ms"].as_f64().unwrap() < 5000.0);
}

fn bad_input_gets_a_clear_error_and_a_nonzero_exit() {
    let out = ampoule()
        .args(["run", "--lang", "cobol", "-"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("unknown language \"cobol\""));
    assert!(text(&out.stderr).contains("hint:"));

    // C# and PowerShell are languages, but of sessions only.
    let out = ampoule()
        .args(["run", "--lang", "c#", "-"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("csharp runs as a session"),
        "{}",
        text(&out.stderr)
    );

    let out = ampoule()
        .args(["run", "/nonexistent/code.py"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("reading /nonexistent/code.py"));

    // Egress flags without an allowed host (the network itself is tested in egress.rs, inside
    // a throw-away namespace: never here, on the machine's own network).
    let out = ampoule()
        .args(["run", "--resolve", "example.com=192.0.2.1", "-"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("--allow-host"));
    let out = ampoule()
        .args(["run", "--allow-host", "*.", "-"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("egress rule \"*.\""));

    let out = ampoule()
        .args(["run", "--timeout=0", "-"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("--timeout"));

    let out = ampoule().args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A command line `ampoule run` refuses, before or after parsing it, ends the sandbox init it
/// forked early (see `early_prefork` in main.rs) before it exits: nothing is left for the
/// caller's reaper. The CLI runs under a Python that is a child subreaper
/// (`PR_SET_CHILD_SUBREAPER`), so any process it leaves behind becomes that Python's child.
fn a_refused_command_line_leaves_no_process_behind() {
    const WATCH: &str = r#"
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
out = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, capture_output=True)
signal.alarm(10)
try:
    pid, status = os.wait()
    print(f"left behind: pid {pid}, status {status}; exit {out.returncode}")
except ChildProcessError:
    print(f"nothing left; exit {out.returncode}")
"#;
    let exe = env!("CARGO_BIN_EXE_ampoule");
    for (args, code) in [
        (&["run", "--no-such-flag", "-"][..], 2),
        (&["run", "--timeout", "soon", "-"][..], 2),
        (&["run", "--lang", "cobol", "-"][..], 125),
        (&["run", "/nonexistent/code.py"][..], 125),
    ] {
        let out = Command::new("/usr/bin/python3")
            .args(["-c", WATCH, exe])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout).trim(),
            format!("nothing left; exit {code}"),
            "ampoule {args:?}"
        );
    }
}

fn doctor_reports_every_layer_and_runtime() {
    let out = ampoule().args(["doctor", "--json"]).output().unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "mode",
        "user namespaces",
        "seccomp",
        "landlock",
        "cgroups",
        "sandbox",
        "runtime python",
        "runtime javascript",
        "runtime shell",
    ] {
        assert!(names.contains(&want), "doctor lacks {want}: {names:?}");
    }
    let sandbox = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sandbox")
        .unwrap();
    assert_eq!(sandbox["level"], "ok", "{sandbox}");
    // Every failing check carries a fix.
    for c in checks.as_array().unwrap() {
        if c["level"] != "ok" {
            assert!(c["fix"].is_string(), "{c} has no fix");
        }
    }
}

/// Lists the sandbox cgroups under every hierarchy's `ampoule` directory.
fn sandbox_cgroups() -> Vec<String> {
    ampoule_runtime::cgroup::CgroupRoot::detect()
        .map(|r| r.children())
        .unwrap_or_default()
}

fn sandbox_processes(marker: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmd).contains(marker)
        {
            v.push(pid);
        }
    }
    v
}

fn a_killed_supervisor_leaves_nothing_running_and_the_next_start_sweeps_its_cgroup() {
    let marker = format!("orphan-marker-{}", std::process::id());
    let mut child = ampoule()
        .args(["run", "--lang", "bash", "--timeout", "60", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("echo started; exec -a {marker} sleep 600").as_bytes())
        .unwrap();
    // Wait until the program runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sandbox_processes(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the sandboxed program never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The sandbox's cgroup, as the kernel reports it for the program.
    let pid = sandbox_processes(&marker)[0];
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let name = own
        .lines()
        .find_map(|l| l.rsplit('/').next().filter(|n| n.starts_with("sbx-")))
        .map(str::to_owned)
        .expect("the program runs in a sandbox cgroup");
    assert!(sandbox_cgroups().contains(&name));
    // Kill the supervisor the hard way.
    child.kill().unwrap();
    child.wait().unwrap();
    // Its sandbox dies with it (parent-death signals down the init chain).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sandbox_processes(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sandboxed processes outlived the supervisor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its cgroup is still there (nobody removed it) until the next start sweeps it.
    let out = run_stdin(&["--lang", "bash"], "true");
    assert!(out.status.success());
    assert!(
        !sandbox_cgroups().contains(&name),
        "orphaned cgroup {name} not swept"
    );
}

/// `ampoule run` pins itself and its forked-ahead init to different CPUs while both prepare
/// (crates/runtime/src/cpus.rs): the program must still get every CPU the caller had.
fn the_program_gets_every_cpu_of_the_caller() {
    let ours = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let expected: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| ours.is_set(c).unwrap())
        .collect();
    let out = run_stdin(
        &[],
        "import os, subprocess\n\
         print(sorted(os.sched_getaffinity(0)))\n\
         print(subprocess.run(['/usr/bin/python3', '-c', \
         'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, \
         text=True).stdout.strip())",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = format!("{expected:?}");
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        [want.clone(), want],
        "the program's CPUs (and its child's)"
    );
}

/// Ignored signals survive `execve`: the supervisor's (Rust ignores SIGPIPE; a caller started
/// with `nohup` or as a background job ignores SIGHUP, SIGINT, SIGQUIT) must not reach the
/// program, where a pipeline's writer would then see EPIPE instead of dying quietly.
fn the_program_starts_with_no_signal_ignored() {
    // The caller ignores SIGHUP and SIGINT too (as `nohup` would), through bash's `trap ''`.
    let out = Command::new("/bin/bash")
        .arg("-c")
        .arg(format!(
            "trap '' HUP INT; exec {} run --lang bash -",
            env!("CARGO_BIN_EXE_ampoule")
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"grep SigIgn /proc/self/status\nyes | head -n 1\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "SigIgn:\t0000000000000000\ny\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("Broken pipe"),
        "{}",
        text(&out.stderr)
    );
}

/// `ampoule run` forks its sandbox's init from itself (no exec with a cleared environment):
/// the init must not keep the caller's environment where `/proc/<pid>/environ` shows it.
fn the_sandbox_init_keeps_nothing_of_the_callers_environment() {
    let secret = format!("s3cret-{}", std::process::id());
    let mut child = ampoule()
        .args(["run", "--lang", "bash", "--timeout", "30", "-"])
        .env("AMPOULE_TEST_SECRET", &secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = format!("environ-marker-{}", std::process::id());
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("exec -a {marker} sleep 30").as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sandbox_processes(&marker).is_empty() {
        assert!(Instant::now() < deadline, "the program never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cli = child.id();
    let children = std::fs::read_to_string(format!("/proc/{cli}/task/{cli}/children")).unwrap();
    let inits: Vec<&str> = children.split_whitespace().collect();
    assert!(!inits.is_empty(), "the CLI has no sandbox init child");
    let ours = std::fs::read(format!("/proc/{cli}/environ")).unwrap();
    assert!(
        text(&ours).contains(&secret),
        "the test did not set the variable"
    );
    for pid in inits {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !text(&env).contains(&secret),
            "the init {pid} shows the caller's environment"
        );
    }
    let program = sandbox_processes(&marker)[0];
    let env = std::fs::read(format!("/proc/{program}/environ")).unwrap();
    assert!(!text(&env).contains(&secret));
    child.kill().unwrap();
    child.wait().unwrap();
}

fn an_ordinary_user_gets_a_sandbox_and_doctor_says_what_is_weaker() {
    // A copy of the binary that user `nobody` can execute.
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("ampoule");
    std::fs::copy(env!("CARGO_BIN_EXE_ampoule"), &bin).unwrap();
    let as_nobody = |args: &[&str], stdin: &str| {
        let mut child = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--reset-env",
            ])
            .arg(&bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = as_nobody(
        &["run", "-"],
        "import os\nst = open('/proc/self/status').read()\nprint(os.getuid(), 'CapEff:\\t0000000000000000' in st, 'Seccomp:\\t2' in st)\n",
    );
    assert_eq!(
        text(&out.stdout),
        "1000 True True\n",
        "{}",
        text(&out.stderr)
    );
    let out = as_nobody(&["doctor", "--json"], "");
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let find = |name: &str| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert!(
        find("mode")["detail"]
            .as_str()
            .unwrap()
            .starts_with("unprivileged")
    );
    assert_eq!(find("sandbox")["level"], "ok");
    // Without a delegated cgroup, the missing limits are reported, never silently skipped.
    let cg = find("cgroups");
    assert_eq!(cg["level"], "warn", "{cg}");
    assert!(cg["detail"].as_str().unwrap().contains("limits are off"));
    assert!(cg["fix"].is_string());
}

/// The binary begins with the functions of crates/cli/hot-code.txt (crates/cli/build.rs): the
/// list reached the linker, and the linker read it. Checked on the binary under test and on
/// the statically linked one of scripts/build.sh when the suite names it (`AMPOULE_BIN`). A
/// build the list does not apply to (another linker than lld, `AMPOULE_HOT_CODE=0`) is
/// skipped with a note; a stale list still places its glibc names (they carry no hash) first.
fn the_hot_code_list_leads_the_binary() {
    let list = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/hot-code.txt"))
        .expect("crates/cli/hot-code.txt");
    let listed: std::collections::HashSet<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        listed.len() > 100,
        "the list names {} functions",
        listed.len()
    );
    let mut bins = vec![env!("CARGO_BIN_EXE_ampoule").to_owned()];
    bins.extend(std::env::var("AMPOULE_BIN").ok());
    for bin in bins {
        let comment = Command::new("readelf")
            .args(["-p", ".comment", &bin])
            .output()
            .expect("readelf");
        if !text(&comment.stdout).contains("LLD")
            || std::env::var("AMPOULE_HOT_CODE").is_ok_and(|v| v == "0")
        {
            eprintln!("{bin}: not linked by lld with the list; skipped");
            continue;
        }
        let nm = Command::new("nm")
            .args(["-n", "-S", "--defined-only", "--no-demangle", &bin])
            .output()
            .expect("nm");
        assert!(nm.status.success(), "nm {bin}: {}", text(&nm.stderr));
        // Code symbols: (address, size, name).
        let symbols = text(&nm.stdout);
        let code: Vec<(u64, u64, &str)> = symbols
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let [addr, size, "t" | "T", name] = f[..] else {
                    return None;
                };
                let hex = |s| u64::from_str_radix(s, 16).ok();
                Some((hex(addr)?, hex(size)?, name))
            })
            .collect();
        let start = code.iter().map(|c| c.0).min().expect("code symbols");
        let hot: Vec<(u64, u64)> = code
            .iter()
            .filter(|c| listed.contains(c.2))
            .map(|c| (c.0, c.1))
            .collect();
        assert!(!hot.is_empty(), "{bin} has none of the listed functions");
        // Placed first, the listed functions lie within twice their size from the start of
        // the code (the rest of a listed function's object section comes along); unordered,
        // about 6 % of them do.
        let size: u64 = hot.iter().map(|h| h.1).sum();
        let near = hot.iter().filter(|h| h.0 < start + 2 * size).count();
        assert!(
            near * 10 >= hot.len() * 9,
            "{bin}: {near} of its {} listed functions lie in the first {size} × 2 bytes of code",
            hot.len()
        );
    }
}

fn main() {
    let args = Arguments::from_args();
    let root = (!is_root()).then_some("starting sandboxes in tests needs root");
    let trials = vec![
        trial(
            "prints_output_and_returns_the_programs_exit_code",
            prints_output_and_returns_the_programs_exit_code,
            root,
        ),
        trial("every_language_runs", every_language_runs, root),
        trial(
            "public_etc_files_match_the_host_and_are_read_only",
            public_etc_files_match_the_host_and_are_read_only,
            root,
        ),
        trial(
            "code_from_a_file_inputs_in_and_outputs_out",
            code_from_a_file_inputs_in_and_outputs_out,
            root,
        ),
        trial(
            "json_result_reports_the_limit_that_decided",
            json_result_reports_the_limit_that_decided,
            root,
        ),
        trial(
            "the_hot_code_list_leads_the_binary",
            the_hot_code_list_leads_the_binary,
            None,
        ),
        trial(
            "bad_input_gets_a_clear_error_and_a_nonzero_exit",
            bad_input_gets_a_clear_error_and_a_nonzero_exit,
            None,
        ),
        trial(
            "a_refused_command_line_leaves_no_process_behind",
            a_refused_command_line_leaves_no_process_behind,
            None,
        ),
        trial(
            "doctor_reports_every_layer_and_runtime",
            doctor_reports_every_layer_and_runtime,
            root,
        ),
        trial(
            "a_killed_supervisor_leaves_nothing_running_and_the_next_start_sweeps_its_cgroup",
            a_killed_supervisor_leaves_nothing_running_and_the_next_start_sweeps_its_cgroup,
            root,
        ),
        trial(
            "the_program_starts_with_no_signal_ignored",
            the_program_starts_with_no_signal_ignored,
            root,
        ),
        trial(
            "the_program_gets_every_cpu_of_the_caller",
            the_program_gets_every_cpu_of_the_caller,
            root,
        ),
        trial(
            "the_sandbox_init_keeps_nothing_of_the_callers_environment",
            the_sandbox_init_keeps_nothing_of_the_callers_environment,
            root,
        ),
        trial(
            "an_ordinary_user_gets_a_sandbox_and_doctor_says_what_is_weaker",
            an_ordinary_user_gets_a_sandbox_and_doctor_says_what_is_weaker,
            root,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}
