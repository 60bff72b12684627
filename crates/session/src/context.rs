//! Language contexts: more kernels inside an existing session's sandbox.
//!
//! A [`Context`] is a language kernel started through an [`Entrance`] (same namespaces,
//! cgroup, ids and seals as the sandbox's own program; see `ampoule_runtime::enter`), driven
//! over the same protocol with the same execute semantics as a [`Session`]: timeouts send
//! `interrupt`, then kill when the code does not stop. Killing a context kills its process
//! group only (it was started with `setsid`), never the sandbox; the sandbox's limits
//! (memory, pids, disk) are shared with everything in it, and `limits` here only sets the
//! context's default timeout and output cap.
//!
//! Where the kernel's files go: the sandbox's `/run/ampoule` holds the files of the kernel it
//! started with (and for a zygote-born sandbox, the zygote's), so a context's files are written
//! by the host, through the sandbox's scratch handle (`openat2`, no symlink followed), to a
//! fresh directory of the sandbox's `/tmp`, and the plug-in's command line and environment are
//! pointed there. Code in the sandbox can change those files; that is no escalation: the
//! kernel runs that same code anyway, as the same user, and the files are its own sandbox's.
//!
//! A context's runtime must be visible in the sandbox: under `/usr`, or among the sandbox's
//! read-only binds (a Python sandbox binds the `ampoule setup` environment; a runtime outside
//! `/usr` that the sandbox lacks fails to start, with the error).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ampoule_runtime::language::CODE_DIR;
use ampoule_runtime::{EnterSpec, Entrance};
use ampoule_types::{ExecutionEvent, ExecutionResult, Limits};

use crate::error::Result;
use crate::language;
use crate::session::{Body, ExecuteRequest, Session};

/// Directory of the sandbox's `/tmp` (scratch area `tmp`) holding the contexts' kernel files.
const CONTEXT_DIR: &str = ".ampoule-context";

/// A language kernel running inside another session's sandbox.
#[derive(Debug)]
pub struct Context {
    session: Session,
}

impl Context {
    /// Starts the kernel of `language` (a plug-in name or alias) in the sandbox behind
    /// `entrance`, in `cwd` (default `/mnt/data`), with the plug-in's environment plus `env`.
    pub async fn start(
        entrance: &Entrance,
        language: &str,
        limits: Limits,
        cwd: Option<&str>,
        env: &[(String, String)],
    ) -> Result<Context> {
        let spec = language::find(language)?.locate(&limits)?;
        Self::start_spec(entrance, spec, limits, cwd, env).await
    }

    /// Starts the kernel `spec` describes (a host runtime's or an image's, see
    /// [`language::image::locate`]) in the sandbox behind `entrance`.
    pub async fn start_spec(
        entrance: &Entrance,
        spec: language::LanguageSpec,
        limits: Limits,
        cwd: Option<&str>,
        env: &[(String, String)],
    ) -> Result<Context> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let scratch = entrance.scratch()?;
        let name = format!(
            "{}-{}-{}",
            spec.language,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        for f in &spec.files {
            scratch.write(
                "tmp",
                &format!("{CONTEXT_DIR}/{name}/{}", f.name),
                f.contents.as_bytes(),
                0o644,
            )?;
        }
        let here = format!("/tmp/{CONTEXT_DIR}/{name}");
        let moved = |s: &str| match s.strip_prefix(CODE_DIR) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{here}{rest}"),
            _ => s.to_owned(),
        };
        let mut vars = ampoule_runtime::language::base_env();
        for (key, value) in spec.env.iter().chain(env) {
            let value = moved(value);
            match vars.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = value,
                None => vars.push((key.clone(), value)),
            }
        }
        let mut process = entrance
            .spawn(&EnterSpec {
                argv: spec.argv.iter().map(|a| moved(a)).collect(),
                env: vars,
                cwd: cwd.unwrap_or("/mnt/data").to_owned(),
                stdin: true,
            })
            .await?;
        let stdio = (
            process.stdin.take(),
            process.stdout.take(),
            process.stderr.take(),
        );
        let session = Session::handshake_body(
            Body::Entered { process, scratch },
            stdio,
            spec.language,
            limits,
        )
        .await?;
        Ok(Context { session })
    }

    /// Runs one piece of code and collects its outcome (as [`Session::execute`]).
    pub async fn execute(&mut self, req: ExecuteRequest) -> Result<ExecutionResult> {
        self.session.execute(req).await
    }

    /// Runs one piece of code, handing each piece of output to `on` as it arrives (as
    /// [`Session::execute_streaming`]).
    pub async fn execute_streaming(
        &mut self,
        req: ExecuteRequest,
        on: impl FnMut(ExecutionEvent) + Send,
    ) -> Result<ExecutionResult> {
        self.session.execute_streaming(req, on).await
    }

    /// The plug-in's name.
    pub fn language(&self) -> &'static str {
        self.session.language()
    }

    /// The runtime, as the kernel reported it.
    pub fn runtime(&self) -> &str {
        self.session.runtime()
    }

    /// Whether the kernel is alive (see [`Session::is_alive`]).
    pub fn is_alive(&self) -> bool {
        self.session.is_alive()
    }

    /// How long interrupted code gets to stop before the context is killed.
    pub fn set_interrupt_grace(&mut self, grace: Duration) {
        self.session.set_interrupt_grace(grace);
    }

    /// Stops the kernel (its process group); the sandbox goes on.
    pub async fn close(self) {
        self.session.close().await;
    }
}

/// The environment a shell command in a sandbox gets by default: the kernels' base
/// (`HOME=/mnt/data`, `LANG`, `TZ`, `TMPDIR`, `USER`), `PATH` with the `ampoule setup`
/// Python environment's `bin` first when it exists (Python sandboxes bind it, so `python` and
/// `pip` are the session's; elsewhere the entry is simply absent), the Python plug-in's
/// settings (unbuffered output, `Agg` plots, caches in `/tmp`), then `extra` on top.
pub fn command_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = ampoule_runtime::language::base_env();
    let python = language::find("python")
        .and_then(|k| k.locate(&Limits::default()))
        .map(|spec| spec.env)
        .unwrap_or_default();
    for (key, value) in python.iter().chain(extra) {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1.clone_from(value),
            None => env.push((key.clone(), value.clone())),
        }
    }
    env
}
