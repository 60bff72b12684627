//! Sessions end to end: real sandboxes running real kernels, through the public API
//! (`Session::start_language` + `execute`), one trial per behaviour and language.
//!
//! Needs root (sandboxes with a unique uid and cgroups); without it every trial is reported as
//! ignored and the reason is printed. Languages whose runtime is missing (C# needs
//! mono-complete, PowerShell needs pwsh) are ignored with the reason printed too. The Python
//! trials that need numpy/pandas/matplotlib build the environment first when it is missing
//! (what `ampoule setup` does), or are ignored with the reason when that is impossible.
//!
//! This binary is also the sandbox init (the runtime re-executes `/proc/self/exe`), hence
//! `harness = false` and the check at the top of `main`.

mod cases;
mod durable;
mod entrance;
mod gvisor;
mod zygote;

use std::future::Future;
use std::pin::Pin;

use ampoule_runtime::Host;
use ampoule_session::{ExecuteRequest, ExecutionResult, Session};
use ampoule_types::{Language, Limits};
use libtest_mimic::{Arguments, Failed, Trial};

pub(crate) type TestFuture = Pin<Box<dyn Future<Output = Result<(), Failed>>>>;

/// One trial: a name, the language it needs, and the async body.
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) language: &'static str,
    pub(crate) needs_packages: bool,
    pub(crate) body: Box<dyn FnOnce(Host) -> TestFuture + Send>,
}

impl Case {
    pub(crate) fn new<F, Fut>(language: &'static str, name: &str, body: F) -> Self
    where
        F: FnOnce(Host) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Failed>> + 'static,
    {
        Self {
            name: format!("{language}/{name}"),
            language,
            needs_packages: false,
            body: Box::new(move |host| Box::pin(body(host))),
        }
    }

    pub(crate) fn needs_packages(mut self) -> Self {
        self.needs_packages = true;
        self
    }
}

/// Starts a session with the given limits.
pub(crate) async fn start(host: &Host, language: &str, limits: Limits) -> Result<Session, Failed> {
    Session::start_language(host, language, limits)
        .await
        .map_err(|e| Failed::from(format!("starting a {language} session: {}", chain(&e))))
}

/// Runs code, failing the trial on a host-side error.
pub(crate) async fn run(s: &mut Session, code: &str) -> Result<ExecutionResult, Failed> {
    run_req(s, ExecuteRequest::new(code)).await
}

pub(crate) async fn run_req(
    s: &mut Session,
    req: ExecuteRequest,
) -> Result<ExecutionResult, Failed> {
    let code = req.code.clone();
    s.execute(req)
        .await
        .map_err(|e| Failed::from(format!("executing {code:?}: {}", chain(&e))))
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        msg.push_str(&format!(": {c}"));
        cur = c.source();
    }
    msg
}

/// Fails with the whole outcome printed when `cond` is false.
#[macro_export]
macro_rules! check {
    ($cond:expr, $out:expr) => {
        if !$cond {
            return Err(libtest_mimic::Failed::from(format!(
                "{} is false; outcome: {:#?}",
                stringify!($cond),
                $out
            )));
        }
    };
}

fn main() {
    if std::env::args_os().nth(1).as_deref() == Some(ampoule_runtime::init::INIT_ARG.as_ref()) {
        ampoule_runtime::init::main();
    }
    let args = Arguments::from_args();
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("sessions: not root, so no sandbox can be built; every trial is ignored");
    }
    let mut cases = cases::all();
    cases.extend(zygote::cases());
    cases.extend(entrance::cases());
    cases.extend(durable::cases());
    cases.extend(gvisor::cases());
    let mut skipped_languages = Vec::new();
    for lang in Language::EVERY.map(Language::as_str) {
        if let Err(e) =
            ampoule_session::language::find(lang).and_then(|k| k.locate(&Limits::default()))
        {
            eprintln!("sessions: skipping {lang} trials: {e}");
            skipped_languages.push(lang);
        }
    }
    let packages = if root && cases.iter().any(|c| c.needs_packages) && !args.list {
        match ensure_python_packages() {
            Ok(()) => true,
            Err(why) => {
                eprintln!("sessions: skipping trials that need Python packages: {why}");
                false
            }
        }
    } else {
        true
    };
    let trials = cases
        .into_iter()
        .map(|case| {
            let ignored = !root
                || skipped_languages.contains(&case.language)
                || (case.needs_packages && !packages);
            let body = case.body;
            Trial::test(case.name, move || {
                let host =
                    Host::detect().map_err(|e| format!("preparing the host: {}", chain(&e)))?;
                // Sandboxes die with the thread that spawned them: this trial's thread.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(body(host))
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// Builds the Python environment when it is missing or incomplete (as `ampoule setup` does).
fn ensure_python_packages() -> Result<(), String> {
    use ampoule_session::setup::{PythonEnv, setup_python};
    let env = PythonEnv::default_location();
    if env.exists() && env.outdated().map(|o| o.is_empty()).unwrap_or(false) {
        return Ok(());
    }
    eprintln!(
        "sessions: building the Python environment in {} (ampoule setup)…",
        env.dir().display()
    );
    let python = std::path::Path::new("/usr/bin/python3");
    setup_python(&env, python, &mut |event| {
        eprintln!("sessions: setup: {event:?}")
    })
    .map(|_| ())
    .map_err(|e| chain(&e))
}
