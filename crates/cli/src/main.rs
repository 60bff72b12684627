//! The `ampoule` command.
//!
//! Data goes to stdout, diagnostics to stderr. Exit codes of `ampoule run`: the program's own,
//! 124 when it timed out, 137 when a limit killed it, 125 when ampoule itself failed.
#![forbid(unsafe_code)]

mod as_command;
mod audit;
mod bench;
mod bench_run;
mod image;
mod keys;
mod printer;
mod setup;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use ampoule_egress::{Egress, EgressSettings, InjectRule, Policy, PolicyConfig};
use ampoule_runtime::doctor::{self, Level};
use ampoule_runtime::scratch::{CODE, DATA};
use ampoule_runtime::{Host, Interpreter, Network, SandboxConfig};
use ampoule_types::{ExecutionStatus, Language, Limits, RunResult};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

/// Exit code when ampoule itself fails (as `timeout` and `docker run` use 125).
const EXIT_INTERNAL: u8 = 125;

#[derive(Parser)]
#[command(
    name = "ampoule",
    version,
    about = "Run untrusted code in sealed, throw-away Linux sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: GlobalArgs,
}

/// `ampoule run …` parsed on its own: clap's derive builds the arguments of every subcommand
/// before it parses, a third of a millisecond on the path of each `ampoule run` (which issue 19
/// wants as cheap as bubblewrap). Same name, version, options and help for `run` as [`Cli`];
/// anything else goes through [`Cli`] (see [`parse_cli`]).
#[derive(Parser)]
#[command(name = "ampoule", version)]
struct RunCli {
    #[command(subcommand)]
    command: RunCommand,
    #[command(flatten)]
    global: GlobalArgs,
}

#[derive(Subcommand)]
enum RunCommand {
    #[command(about = RUN_ABOUT)]
    Run(RunArgs),
}

const RUN_ABOUT: &str = "Run code once in a fresh sandbox, then destroy it.";

/// Options of every subcommand.
#[derive(Args)]
struct GlobalArgs {
    /// Log lines on stderr as `text` or `json` (one object per line, with the request,
    /// session and execution ids); `AMPOULE_LOG` sets the level (default warn).
    #[arg(long, global = true, value_name = "FORMAT", env = "AMPOULE_LOG_FORMAT", display_order = 1000,
          default_value = "text", value_parser = clap::builder::PossibleValuesParser::new(["text", "json"]))]
    log_format: String,
}

/// Forks `ampoule run`'s sandbox init before the arguments are parsed, when they cannot ask
/// for anything but a fresh sandbox of the default tier without network (no argument names
/// another tier, a zygote, a command or an allowed host, and none asks for help, which clap
/// answers by exiting): the init's first step, making its
/// network namespace (~0.5 ms), then overlaps the parsing (~0.2 ms) instead of following it.
/// `None` otherwise, and for every other subcommand: `main` forks after the parsing, as it
/// decides. An argument that merely looks like one of those flags (a value, say) only costs
/// the early start; one that clap reads differently than this scan is impossible, as the
/// flags have no short forms, environment fallbacks or abbreviations.
fn early_prefork() -> Option<ampoule_runtime::Result<ampoule_runtime::prefork::PreforkedInit>> {
    usual_run(std::env::args_os().skip(1)).then(|| ampoule_runtime::prefork::prefork(true))
}

/// Whether these arguments (the program's name left out) are `run` in its usual form (see
/// [`early_prefork`]).
fn usual_run(mut args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    if args.next().as_deref() != Some("run".as_ref()) {
        return false;
    }
    let other = [
        "--zygote",
        "--as-command",
        "--isolation",
        "--allow-host",
        "--help",
    ];
    args.all(|a| {
        let a = a.as_encoded_bytes();
        a != b"-h" && !other.iter().any(|f| a.starts_with(f.as_bytes()))
    })
}

/// The command line, through [`RunCli`] when it starts with `run`.
fn parse_cli() -> Result<Cli, clap::Error> {
    if std::env::args_os().nth(1).as_deref() == Some("run".as_ref()) {
        let RunCli {
            command: RunCommand::Run(args),
            global,
        } = RunCli::try_parse()?;
        return Ok(Cli {
            command: Command::Run(args),
            global,
        });
    }
    Cli::try_parse()
}

#[derive(Subcommand)]
enum Command {
    #[command(about = RUN_ABOUT)]
    Run(RunArgs),
    /// The server: native REST API (/v1) and the ACA dynamic-sessions compatible API.
    Serve(ServeArgs),
    /// Install or refresh the language environments sessions use (Python packages).
    Setup(setup::SetupArgs),
    /// MCP server on stdio: code-execution tools for MCP clients (Claude Desktop, VS Code…),
    /// over a server's API (--url) or running sandboxes itself.
    Mcp(McpArgs),
    /// The audit log: list a tenant's records, or `verify` the hash chain.
    Audit(audit::AuditArgs),
    /// Benchmarks on this machine (root): new-session latency through the HTTP API with and
    /// without a zygote or warm pool, round trips, throughput, density, baselines.
    Bench(bench::BenchArgs),
    /// Images for pools (`[pools.X] image = "NAME:TAG"`): import an OCI layout or a
    /// `docker save` archive, pull from a registry, list, remove.
    Image(image::ImageArgs),
    /// API keys without a restart: add (with an expiry), list, revoke, rotate (the old key
    /// works for a grace period).
    Keys(keys::KeysArgs),
    /// Check which isolation layers and language runtimes work on this host.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The TOML config (PRODUCT.md §3); without one: a `python` pool, a generated API key.
    #[arg(long, value_name = "FILE", env = "AMPOULE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding the config's `[server] listen` (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

#[derive(Args)]
struct McpArgs {
    /// The ampoule server to use (`http://host:port`); without it, sandboxes run in this
    /// process (root, or the unprivileged mode `doctor` describes).
    #[arg(long, value_name = "URL", env = "AMPOULE_URL")]
    url: Option<String>,
    /// The server's API key (with --url).
    #[arg(
        long,
        value_name = "KEY",
        env = "AMPOULE_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Without --url: a server config whose pools and limits to use (default: one python pool).
    #[arg(long, value_name = "FILE", env = "AMPOULE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Language of the code: python, javascript (js, node) or shell (bash).
    #[arg(long, short, default_value = "python")]
    lang: String,
    /// Wall-clock limit in seconds.
    #[arg(long, default_value_t = Limits::default().timeout_s)]
    timeout: f64,
    /// Memory limit in MiB (including swap).
    #[arg(long, default_value_t = Limits::default().memory_mib)]
    memory: u64,
    /// Maximum number of processes and threads.
    #[arg(long, default_value_t = Limits::default().pids)]
    pids: u64,
    /// Size of /mnt/data plus /tmp, in MiB.
    #[arg(long, default_value_t = Limits::default().disk_mib)]
    disk: u64,
    /// Bytes kept per output stream.
    #[arg(long, default_value_t = Limits::default().output_bytes)]
    output_bytes: u64,
    /// Let the code reach this host through the egress gateway (repeatable; root only):
    /// `host`, `host:port`, `*.domain[:port]` or an IP literal. Without it: no network.
    #[arg(long = "allow-host", value_name = "HOST")]
    allow_host: Vec<String>,
    /// Refuse this host even when an --allow-host rule matches it (repeatable).
    #[arg(long = "deny-host", value_name = "HOST")]
    deny_host: Vec<String>,
    /// Make the egress gateway resolve NAME to IP, like curl's --resolve (repeatable). A pin
    /// also permits a private address for that name.
    #[arg(long = "resolve", value_name = "NAME=IP")]
    resolve: Vec<String>,
    /// Add HEADER to every request for HOST, with the value of this process's environment
    /// variable ENV_VAR; the sandbox never sees it (repeatable).
    #[arg(long = "inject", value_name = "HOST:HEADER=ENV_VAR")]
    inject: Vec<String>,
    /// Copy this file into /mnt/data before the code runs (repeatable).
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Copy what the code left in /mnt/data into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print the full result object as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Run the code as one execution of a Python session forked from a zygote (the server's
    /// fast path; root only) instead of a fresh interpreter.
    #[arg(long)]
    zygote: bool,
    /// Run the program as a command entered into a live Python session's sandbox — how
    /// sandbox processes and E2B commands run — instead of as the sandbox's program (python
    /// or shell; with --zygote the session is forked from a zygote, the server's default;
    /// root only). For testing containment.
    #[arg(long, hide_short_help = true)]
    as_command: bool,
    /// The isolation tier: `namespaces` (the default: namespaces, seccomp, Landlock and
    /// cgroups on the host kernel) or `gvisor` (gVisor's user-space kernel, `runsc`; root).
    #[arg(long, default_value = "namespaces", value_parser = parse_isolation)]
    isolation: ampoule_runtime::Isolation,
    /// File with the code, or `-` for standard input.
    code: String,
}

fn parse_isolation(s: &str) -> Result<ampoule_runtime::Isolation, String> {
    s.parse()
}

fn main() -> ExitCode {
    // The same binary is the sandbox's init; this must run before anything else (no threads,
    // no runtime, no logging).
    if std::env::args_os().nth(1).as_deref() == Some(ampoule_runtime::init::INIT_ARG.as_ref()) {
        ampoule_runtime::init::main();
    }
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(ampoule_runtime::undertaker::ARG.as_ref()) {
        let pid = args.next().unwrap_or_default();
        ampoule_server::logging::init(Default::default());
        let code = ampoule_runtime::undertaker::main(&pid.to_string_lossy());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // `ampoule run`'s sandbox init is forked while this process is single-threaded, rather
    // than started again as the ampoule binary later (see `ampoule_runtime::prefork`); in
    // the usual form of the command, before the arguments are parsed (see `early_prefork`).
    let early = early_prefork();
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            // An init forked early ends (killed and reaped) before clap's message and exit,
            // rather than outliving us as a zombie for our parent's reaper to find.
            drop(early);
            e.exit()
        }
    };
    let preforked = match &cli.command {
        Command::Run(a)
            if !a.zygote
                && !a.as_command
                && a.isolation == ampoule_runtime::Isolation::Namespaces =>
        {
            Some(
                early.unwrap_or_else(|| ampoule_runtime::prefork::prefork(a.allow_host.is_empty())),
            )
        }
        // Not wanted after all (the scan keeps this from happening): dropping it ends it.
        _ => {
            drop(early);
            None
        }
    };
    ampoule_server::logging::init(cli.global.log_format.parse().unwrap_or_default());
    // Sandboxes ask to die with the thread that spawned them: a current-thread runtime keeps
    // that thread (the main thread) alive for as long as they live. `serve` runs many at once
    // on a multi-thread runtime, whose worker threads live as long as the runtime does (it
    // never starts a sandbox from `spawn_blocking`).
    let mut builder = match cli.command {
        Command::Serve(_) | Command::Mcp(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(anyhow::Error::new(e).context("starting the async runtime")),
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let init = match preforked {
                    Some(Ok(init)) => Some(init),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "no init forked ahead: starting one");
                        None
                    }
                    None => None,
                };
                run(args, init).await
            }
            Command::Serve(args) => serve(args).await,
            Command::Mcp(args) => mcp(args).await,
            Command::Setup(args) => setup::run(args),
            Command::Doctor { json } => doctor(json).await,
            Command::Audit(args) => audit::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Image(args) => image::run(args).await,
            Command::Keys(args) => keys::run(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => report(e),
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => ampoule_server::Config::load(path)?,
        None => ampoule_server::Config::default(),
    };
    // Cleans up after us if we are killed (see `ampoule_runtime::undertaker`).
    let undertaker = match std::env::current_exe()
        .and_then(|exe| ampoule_runtime::undertaker::spawn(&exe))
    {
        Ok(child) => Some(child),
        Err(e) => {
            tracing::warn!(error = %e, "no undertaker: a killed server's sandboxes wait for the next start");
            None
        }
    };
    let served =
        ampoule_server::serve::serve(cfg, args.listen, std::sync::Arc::new(printer::serve_notice))
            .await;
    // Ended by us, cleanly or with an error: nothing is left for the undertaker.
    if let Some(mut u) = undertaker {
        let _ = u.kill();
        let _ = u.wait();
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

/// `ampoule mcp`: MCP on stdio (stdout is the protocol: nothing else may be printed there).
async fn mcp(args: McpArgs) -> Result<ExitCode> {
    let caller = ampoule_mcp::Caller::new(ampoule_server::config::GENERATED_TENANT);
    if let Some(url) = &args.url {
        let api = ampoule_mcp::client::HttpApi::new(url, args.api_key.clone())?;
        ampoule_mcp::serve_stdio(Arc::new(api), caller).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = match &args.config {
        Some(path) => ampoule_server::Config::load(path)?,
        None => {
            // One client, one user: a single warm sandbox instead of a server's stock.
            let mut cfg = ampoule_server::Config::default();
            let pool = ampoule_server::config::PoolConfig {
                warm: 1,
                ..Default::default()
            };
            cfg.pools.insert("python".into(), pool);
            cfg
        }
    };
    let host = Host::detect().context("preparing the host")?;
    host.sweep_orphans();
    let engine = Arc::new(
        ampoule_server::session_engine::SessionEngine::new(Arc::new(host))
            .with_egress(cfg.egress()?),
    );
    let state = ampoule_server::serve::state(&cfg, engine, ampoule_server::auth::Keys::default())?;
    let manager = state.manager.clone();
    // Like `ampoule serve`, every execution is written down (the config's `[audit]`).
    ampoule_server::serve::audit(&cfg, &manager).await?;
    manager.start_background();
    let api = ampoule_server::mcp::ManagerApi::new(manager.clone(), state.max_upload);
    let served = tokio::select! {
        r = ampoule_mcp::serve_stdio(Arc::new(api), caller) => r.map_err(anyhow::Error::from),
        () = ampoule_server::serve::signal() => Ok(()),
    };
    // Every sandbox goes with the client.
    manager.shutdown().await;
    if let Some(a) = manager.audit() {
        let _ = a.writer.flush().await;
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

fn report(e: anyhow::Error) -> ExitCode {
    let mut msg = format!("error: {e}");
    for cause in e.chain().skip(1) {
        msg.push_str(&format!("\n  caused by: {cause}"));
    }
    eprintln!("{msg}");
    ExitCode::from(EXIT_INTERNAL)
}

async fn run(
    args: RunArgs,
    preforked: Option<ampoule_runtime::prefork::PreforkedInit>,
) -> Result<ExitCode> {
    let Some(language) = Language::parse(&args.lang) else {
        bail!(
            "unknown language {:?}\nhint: use python, javascript or shell",
            args.lang
        );
    };
    if !language.one_shot() {
        bail!(
            "`ampoule run` runs python, javascript or shell, not {language}\nhint: {language} \
             runs as a session (`ampoule serve` with a {language} pool)"
        );
    }
    if args.allow_host.is_empty()
        && (!args.deny_host.is_empty() || !args.resolve.is_empty() || !args.inject.is_empty())
    {
        bail!(
            "--deny-host, --resolve and --inject only apply to hosts allowed with --allow-host\n\
             hint: add --allow-host HOST"
        );
    }
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let code = if args.code == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading code from stdin")?;
        buf
    } else {
        std::fs::read(&args.code).with_context(|| format!("reading {}", args.code))?
    };
    let mut inputs = Vec::new();
    for path in &args.files {
        let name = path
            .file_name()
            .with_context(|| format!("{} has no file name", path.display()))?
            .to_string_lossy()
            .into_owned();
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        inputs.push((name, data));
    }

    if args.isolation != ampoule_runtime::Isolation::Namespaces && (args.as_command || args.zygote)
    {
        bail!(
            "--isolation {} runs a fresh sandbox: drop --as-command and --zygote",
            args.isolation
        );
    }
    if args.as_command {
        if !matches!(language, Language::Python | Language::Shell)
            || (args.zygote && language != Language::Python)
            || !args.allow_host.is_empty()
            || args.out.is_some()
        {
            bail!(
                "--as-command runs python or shell (python only with --zygote), without \
                 network or --out\nhint: drop --allow-host and --out, or drop --as-command"
            );
        }
        let limits = run_limits(&args);
        let result = as_command::run(language, args.zygote, &limits, &code, &inputs).await?;
        if !args.json {
            print!("{}", result.stdout);
            eprint!("{}", result.stderr);
        }
        print_result(&result, &limits, args.json)?;
        return Ok(ExitCode::from(
            u8::try_from(result.exit_code & 0xff).unwrap_or(1),
        ));
    }
    if args.zygote {
        if language != Language::Python || !args.allow_host.is_empty() || args.out.is_some() {
            bail!(
                "--zygote runs Python without network or --out\nhint: drop --lang, --allow-host \
                 and --out, or drop --zygote"
            );
        }
        return run_forked(&args, code, inputs).await;
    }
    let interpreter = Interpreter::find(language)?;
    let mut cfg = SandboxConfig::new(interpreter.argv());
    cfg.env.extend(interpreter.env.iter().cloned());
    cfg.ro_binds = interpreter.binds.clone();
    cfg.limits = run_limits(&args);
    cfg.isolation = args.isolation;

    let egress = if args.allow_host.is_empty() {
        None
    } else {
        let (egress, policy) = egress_setup(&args)?;
        cfg.network = Network::Allowlist {
            trusted_ca_pem: egress.trusted_ca_pem(&policy),
        };
        Some((egress, Arc::new(policy)))
    };

    tracing::debug!("preparing the host");
    let host = Host::detect().context("preparing the host")?;
    if let Some(init) = preforked {
        host.give_preforked_init(init);
    }
    tracing::debug!("host ready");
    // Leftovers of killed runs are swept while the program runs, off its critical path; and
    // only when a cgroup exists to be swept (asked before ours is made: one `stat` per
    // hierarchy instead of a thread listing each hierarchy's directory on every run).
    let sweeper = host.may_have_orphans().then(|| {
        let host = host.clone();
        std::thread::spawn(move || host.sweep_orphans())
    });
    let file_name = interpreter.file_name;
    // Without --json the program's output streams to ours as it is produced.
    let echo = if args.json {
        ampoule_runtime::run::Echo::Off
    } else {
        ampoule_runtime::run::Echo::On
    };
    let mut gateway = None;
    let (mut result, sandbox) = ampoule_runtime::run::run_with(&host, &cfg, echo, |p| {
        // The gateway must listen before the program's first connection.
        if let (Some((egress, policy)), Some(addrs)) = (&egress, p.network) {
            gateway = Some(
                egress
                    .start(
                        ampoule_egress::Endpoints {
                            proxy: addrs.proxy(),
                            dns: addrs.dns(),
                            peer: Some(addrs.sandbox.into()),
                        },
                        policy.clone(),
                        &addrs.interface,
                    )
                    .map_err(|e| ampoule_runtime::Error::Network(format!("egress gateway: {e}")))?,
            );
        }
        let scratch = p.scratch;
        scratch.write(CODE, file_name, &code, 0o644)?;
        for (name, data) in &inputs {
            scratch.write(DATA, name, data, 0o644)?;
        }
        Ok(())
    })
    .await?;
    if args.json {
        result.files = sandbox.scratch().list(DATA).unwrap_or_default();
    }
    if let Some(dir) = &args.out {
        sandbox
            .scratch()
            .copy_out(dir, cfg.limits.disk_mib.saturating_mul(1024 * 1024))
            .with_context(|| format!("copying outputs to {}", dir.display()))?;
    }
    // With a gateway the sandbox goes before its events are read. Without one, a finished
    // sandbox of which only descriptors are left (not a gVisor one: its drop unmounts its run
    // directory) goes with this process at `exit_now` below: the kernel closes them without
    // a system call each.
    let _finished = if egress.is_none() && sandbox.only_descriptors_left() {
        Some(sandbox)
    } else {
        drop(sandbox);
        None
    };
    if let Some(sweeper) = sweeper {
        let _ = sweeper.join();
    }
    tracing::debug!("sandbox gone");
    if let Some(gw) = gateway {
        result.egress = gw.events();
        if gw.dropped_events() > 0 {
            tracing::warn!(
                dropped = gw.dropped_events(),
                "egress events beyond the cap were logged but not kept"
            );
        }
    }
    print_result(&result, &cfg.limits, args.json)?;
    let code = u8::try_from(result.exit_code & 0xff).unwrap_or(1);
    if egress.is_none() {
        // Nothing of the run is left but descriptors (the sandbox and its cgroup are gone; the
        // scratch and the slot go with our descriptors at exit): only this process's own
        // teardown, whose libc exit path (destructors of the loaded objects, thread-local
        // ones, the runtime's threads) faults in pages a forked process never touched. Skip it
        // (an egress gateway's clean-up is not skipped: that run returns).
        use std::io::Write;
        let _ = std::io::stdout().flush();
        ampoule_runtime::prefork::exit_now(i32::from(code));
    }
    Ok(ExitCode::from(code))
}

/// The limits `ampoule run`'s flags set.
fn run_limits(args: &RunArgs) -> Limits {
    Limits {
        timeout_s: args.timeout,
        memory_mib: args.memory,
        pids: args.pids,
        disk_mib: args.disk,
        output_bytes: args.output_bytes,
        ..Limits::default()
    }
}

/// `ampoule run --zygote`: the code as the first execution of a zygote-born Python session.
async fn run_forked(
    args: &RunArgs,
    code: Vec<u8>,
    inputs: Vec<(String, Vec<u8>)>,
) -> Result<ExitCode> {
    use ampoule_session::{ExecuteRequest, Session};
    let limits = run_limits(args);
    let host = Host::detect().context("preparing the host")?;
    host.sweep_orphans();
    let preload: Vec<String> = ampoule_session::zygote::DEFAULT_PRELOAD
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let zygote = ampoule_session::zygote::start_python(&host, &preload, 1)
        .await
        .context("starting the zygote")?;
    let mut session = Session::start_forked(&host, &zygote, limits.clone())
        .await
        .context("forking a session")?;
    for (name, data) in &inputs {
        session.scratch().write(DATA, name, data, 0o644)?;
    }
    let code = String::from_utf8(code).context("the code is not UTF-8")?;
    let r = session.execute(ExecuteRequest::new(code)).await?;
    let exit = if r.session_state == ampoule_types::SessionState::Lost {
        session.program_exit().await
    } else {
        None
    };
    let files = session.scratch().list(DATA).unwrap_or_default();
    drop(session);
    zygote.close().await;
    let (signal, lost_code) = match exit {
        Some(ampoule_runtime::ProgramExit::Signaled(sig)) => (Some(sig), Some(128 + sig)),
        Some(ampoule_runtime::ProgramExit::Exited(code)) => (None, Some(code)),
        _ => (None, None),
    };
    let exit_code = match (r.status, r.limit, lost_code) {
        (ExecutionStatus::TimedOut, _, _) => 124,
        (ExecutionStatus::Killed, Some(_), _) => 137,
        (_, _, Some(code)) => code,
        (ExecutionStatus::Succeeded, _, _) => r.exit_code.unwrap_or(0),
        _ => r.exit_code.filter(|c| *c != 0).unwrap_or(1),
    };
    let mut stderr = r.stderr.clone();
    if let Some(e) = r
        .error
        .as_ref()
        .filter(|_| r.status == ExecutionStatus::Failed)
    {
        stderr.push_str(&e.traceback.join(""));
    }
    let result = RunResult {
        status: r.status,
        exit_code,
        signal,
        limit: r.limit,
        limits_hit: r.limit.into_iter().collect(),
        stdout: r.stdout.clone(),
        stderr,
        stdout_truncated: r.stdout_truncated,
        stderr_truncated: r.stderr_truncated,
        duration_ms: r.duration_ms,
        cpu_time_ms: r.cpu_time_ms,
        peak_memory_bytes: r.peak_memory_bytes,
        files,
        egress: Vec::new(),
    };
    if !args.json {
        print!("{}", result.stdout);
        eprint!("{}", result.stderr);
    }
    print_result(&result, &limits, args.json)?;
    Ok(ExitCode::from(u8::try_from(exit_code & 0xff).unwrap_or(1)))
}

fn print_result(r: &RunResult, limits: &Limits, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, r)?;
        writeln!(out)?;
        return Ok(());
    }
    // The output itself was streamed while the program ran; only ampoule's notes remain.
    let mut err = std::io::stderr().lock();
    for (name, cut) in [
        ("stdout", r.stdout_truncated),
        ("stderr", r.stderr_truncated),
    ] {
        if cut {
            writeln!(
                err,
                "ampoule: {name} truncated at {} bytes",
                limits.output_bytes
            )?;
        }
    }
    for e in r.egress.iter().filter(|e| !e.allowed) {
        let host = if e.host.is_empty() { "?" } else { &e.host };
        let protocol = serde_json::to_value(e.protocol).unwrap_or_default();
        writeln!(
            err,
            "ampoule: egress blocked: {} {host}:{} ({})",
            protocol.as_str().unwrap_or("?"),
            e.port,
            e.reason
        )?;
    }
    match (r.status, r.limit) {
        (ExecutionStatus::TimedOut, _) => {
            writeln!(err, "ampoule: timed out after {} s", limits.timeout_s)?;
        }
        (ExecutionStatus::Killed, Some(limit)) => {
            let what = match limit {
                ampoule_types::LimitKind::Memory => {
                    format!("memory limit ({} MiB)", limits.memory_mib)
                }
                ampoule_types::LimitKind::Pids => format!("process limit ({})", limits.pids),
                ampoule_types::LimitKind::Disk => format!("disk limit ({} MiB)", limits.disk_mib),
                ampoule_types::LimitKind::Output => {
                    format!("output limit ({} bytes)", limits.output_bytes)
                }
                other => format!("{other} limit"),
            };
            writeln!(err, "ampoule: killed: {what}")?;
        }
        _ => {}
    }
    Ok(())
}

/// The egress policy and gateway settings of `ampoule run`'s flags.
fn egress_setup(args: &RunArgs) -> Result<(Egress, Policy)> {
    let mut inject = Vec::new();
    for spec in &args.inject {
        let parsed = spec.split_once('=').and_then(|(lhs, env)| {
            let (host, header) = lhs.split_once(':')?;
            Some(InjectRule {
                host: host.to_owned(),
                header: header.to_owned(),
                value_from_env: Some(env.to_owned()),
                oauth2: None,
            })
        });
        let Some(rule) = parsed else {
            bail!(
                "--inject {spec:?}: expected HOST:HEADER=ENV_VAR\n\
                 hint: --inject api.example.com:Authorization=EXAMPLE_TOKEN"
            );
        };
        inject.push(rule);
    }
    let policy = Policy::compile(
        &PolicyConfig {
            allow: args.allow_host.clone(),
            deny: args.deny_host.clone(),
            inject,
        },
        |name| std::env::var(name).ok(),
    )?;
    let mut hosts = BTreeMap::new();
    for spec in &args.resolve {
        let Some((name, ip)) = spec.split_once('=') else {
            bail!(
                "--resolve {spec:?}: expected NAME=IP\nhint: --resolve api.internal.test=10.77.0.2"
            );
        };
        hosts.insert(name.to_owned(), ip.to_owned());
    }
    let egress = Egress::new(&EgressSettings {
        hosts,
        extra_roots: EgressSettings::roots_from_env(),
    })?;
    Ok((egress, policy))
}

async fn doctor(json: bool) -> Result<ExitCode> {
    let mut checks = doctor::run().await;
    // One line per session language (and the Python packages), each with what to install.
    checks.extend(ampoule_session::doctor::checks());
    let failed = checks.iter().any(|c| c.level == Level::Fail);
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &checks)?;
        writeln!(out)?;
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            let tag = match c.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            writeln!(out, "{tag}  {:width$}  {}", c.name, c.detail)?;
            if let Some(fix) = &c.fix {
                writeln!(out, "      {:width$}  fix: {fix}", "")?;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn run_help(mut cmd: clap::Command) -> String {
        cmd.build();
        cmd.find_subcommand_mut("run")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default()
    }

    /// The scan that forks `ampoule run`'s init before parsing must say no to every argument
    /// that asks for another kind of sandbox (the early init would be the wrong one: made
    /// without network for a run with allowed hosts, say), and to other subcommands.
    #[test]
    fn only_the_usual_run_forks_its_init_before_parsing() {
        let usual = |argv: &[&str]| usual_run(argv.iter().map(std::ffi::OsString::from));
        assert!(usual(&["run", "-"]));
        assert!(usual(&[
            "run",
            "--timeout",
            "5",
            "--memory",
            "256",
            "--json",
            "code.py"
        ]));
        assert!(usual(&["run", "--lang", "shell", "--file", "in.csv", "-"]));
        for other in [
            &["run", "--zygote", "-"][..],
            &["run", "--as-command", "-"],
            &["run", "--isolation", "gvisor", "-"],
            &["run", "--isolation=gvisor", "-"],
            &["run", "--allow-host", "example.com", "-"],
            &["run", "--allow-host=example.com", "-"],
            &["run", "--help"],
            &["run", "-h"],
            &["serve"],
            &["--log-format", "json", "run", "-"],
            &[],
        ] {
            assert!(!usual(other), "{other:?}");
            // And parsing agrees wherever it is a run: it asks for something else (help is
            // an "error" of clap's, so it never gets here).
            if other.first() == Some(&"run")
                && let Ok(RunCli {
                    command: RunCommand::Run(a),
                    ..
                }) =
                    RunCli::try_parse_from(std::iter::once("ampoule").chain(other.iter().copied()))
            {
                assert!(
                    a.zygote
                        || a.as_command
                        || a.isolation != ampoule_runtime::Isolation::Namespaces
                        || !a.allow_host.is_empty(),
                    "{other:?}"
                );
            }
        }
    }

    #[test]
    fn ampoule_run_parses_alone_as_it_does_among_every_subcommand() {
        Cli::command().debug_assert();
        RunCli::command().debug_assert();
        let full = run_help(Cli::command());
        assert!(full.contains("--timeout"), "{full}");
        assert_eq!(full, run_help(RunCli::command()));
        let argv = [
            "ampoule",
            "run",
            "--timeout",
            "3",
            "--log-format",
            "json",
            "-",
        ];
        let RunCli {
            command: RunCommand::Run(alone),
            global,
        } = RunCli::try_parse_from(argv).unwrap();
        let Cli {
            command: Command::Run(full),
            ..
        } = Cli::try_parse_from(argv).unwrap()
        else {
            panic!("not parsed as run");
        };
        assert_eq!(global.log_format, "json");
        assert_eq!((alone.timeout, alone.code.as_str()), (3.0, "-"));
        assert_eq!((full.timeout, full.code.as_str()), (3.0, "-"));
        assert!(RunCli::try_parse_from(["ampoule", "run", "--no-such-flag", "-"]).is_err());
    }
}
