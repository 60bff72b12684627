//! End to end: the official MCP Python SDK (`tests/clients/mcp_smoke.py`, in the virtual
//! environment named by `AMPOULE_CLIENT_VENV`, which `scripts/test.sh` creates) against the
//! real binary, over both transports:
//! - streamable HTTP: `ampoule serve` at `/mcp`, with a bearer key;
//! - stdio: `ampoule mcp --url` talking to that server, and `ampoule mcp` alone, running its
//!   own sandboxes.
//!
//! Needs root (real sandboxes); as another user the trial is reported as ignored, with the
//! reason, as it is outside CI without `AMPOULE_CLIENT_VENV`. In CI, or when the variable is
//! set, a missing venv fails the test. Only 127.0.0.1 is bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ampoule_testkit::host::{is_root, trial};
use ampoule_testkit::paths::binary;
use ampoule_testkit::serve::Serve;

const KEY: &str = "mcp-e2e-key";

fn client_venv() -> Option<PathBuf> {
    ampoule_testkit::paths::client_venv("the MCP client")
}

/// `ampoule serve` with `config` and the test's key, its log echoed.
fn serve(config: &Path) -> Serve {
    let mut cmd = Command::new(binary());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("AMPOULE_MCP_E2E_KEY", KEY)
        .stdout(Stdio::null());
    Serve::spawn(cmd, true).unwrap()
}

fn smoke(venv: &Path, args: &[&str]) {
    smoke_with(venv, args, &[]);
}

/// [`smoke`] with extra environment for the client script (`MCP_SMOKE_KERNEL_RELEASE`).
fn smoke_with(venv: &Path, args: &[&str], env: &[(&str, &str)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/mcp_smoke.py");
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(&script).args(args);
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("mcp smoke: all passed"),
        "the MCP client failed ({args:?}):\n{stdout}\n{stderr}"
    );
}

fn mcp_over_streamable_http_and_stdio() {
    // `main` ignores the trial when the variable is unset outside CI.
    let venv = client_venv().expect("AMPOULE_CLIENT_VENV is set");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_MCP_E2E_KEY\"\n\
             [pools.python]\nwarm = 1\nmax_sessions = 20\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let server = serve(&config);
    let url = format!("http://127.0.0.1:{}", server.port);
    let bin = binary();
    let bin = bin.to_str().unwrap();

    // Streamable HTTP, in process in `ampoule serve`.
    smoke(&venv, &["http", &format!("{url}/mcp"), KEY]);
    // stdio, through the server's native API.
    smoke(
        &venv,
        &["stdio", bin, "mcp", "--url", &url, "--api-key", KEY],
    );
    server.stop().unwrap();
    // stdio, running its own sandboxes (the SDK starts it with a minimal environment: no
    // AMPOULE_URL reaches it).
    smoke(&venv, &["stdio", bin, "mcp"]);
}

/// The whole smoke against a `gvisor` pool (the only Python pool, so every tool call lands on
/// gVisor): over streamable HTTP in `ampoule serve`, and over stdio in `ampoule mcp --config`
/// running its own gVisor sandboxes. Besides everything the smoke checks (state across calls,
/// charts, files), the code must see gVisor's kernel (release 4.4.0), not the host's.
fn mcp_on_a_gvisor_pool() {
    let venv = client_venv().expect("AMPOULE_CLIENT_VENV is set");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n\
             [[auth.keys]]\ntenant = \"a\"\nkey_env = \"AMPOULE_MCP_E2E_KEY\"\n\
             [pools.python]\nisolation = \"gvisor\"\nwarm = 1\nmax_sessions = 8\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let gvisor = [("MCP_SMOKE_KERNEL_RELEASE", "4.4.0")];
    let server = serve(&config);
    let url = format!("http://127.0.0.1:{}/mcp", server.port);
    smoke_with(&venv, &["http", &url, KEY], &gvisor);
    server.stop().unwrap();
    let bin = binary();
    let config = config.to_str().unwrap();
    smoke_with(
        &venv,
        &["stdio", bin.to_str().unwrap(), "mcp", "--config", config],
        &gvisor,
    );
}

/// `execute_code` with `language: csharp` runs in the config's C# pool and keeps its state:
/// raw JSON-RPC over `ampoule mcp`'s stdio, one request per line, each answer read before the
/// next request.
fn csharp_over_stdio() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ampoule.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = \"{}\"\n[pools.python]\nwarm = 0\nzygote = false\n\
             [pools.cs]\nlanguage = \"csharp\"\nwarm = 0\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(binary())
        .args(["mcp", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut call = |request: serde_json::Value| -> Option<serde_json::Value> {
        writeln!(stdin, "{request}").unwrap();
        request.get("id")?;
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        Some(serde_json::from_str(&line).unwrap())
    };
    call(
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {},
        "clientInfo": {"name": "e2e", "version": "1"}}}),
    );
    call(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let mut execute = |id: u64, code: &str| {
        let r = call(
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "execute_code", "arguments": {
                "code": code, "language": "csharp", "session": "cs-1"}}}),
        )
        .unwrap();
        let text = r["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(text).unwrap_or_else(|e| panic!("{e}: {r}"))
    };
    let first = execute(2, "var z = 20;");
    assert_eq!(first["status"], "succeeded", "{first}");
    let second = execute(3, "z + 1");
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(second["result"], "21", "{second}");
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let skip = if !is_root() {
        Some("the MCP end-to-end test runs sandboxes and needs root")
    } else if std::env::var_os("AMPOULE_CLIENT_VENV").is_none() && std::env::var_os("CI").is_none()
    {
        Some("set AMPOULE_CLIENT_VENV to a venv with the `mcp` package")
    } else {
        None
    };
    let csharp_skip = if !is_root() {
        Some("running sandboxes needs root")
    } else if !Path::new("/usr/bin/mono").exists() {
        Some("no Mono here (apt-get install mono-complete)")
    } else {
        None
    };
    let gvisor_skip = if ampoule_runtime::gvisor::find().is_some() {
        None
    } else if std::env::var_os("CI").is_some() {
        panic!("runsc is missing in CI (scripts/deps.sh installs it)");
    } else {
        Some("runsc is not installed (apt-get install runsc)".to_owned())
    };
    let trials = vec![
        trial(
            "mcp_over_streamable_http_and_stdio",
            mcp_over_streamable_http_and_stdio,
            skip,
        ),
        trial("csharp_over_stdio", csharp_over_stdio, csharp_skip),
        trial(
            "mcp_on_a_gvisor_pool",
            mcp_on_a_gvisor_pool,
            skip.or(gvisor_skip.as_deref()),
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}
