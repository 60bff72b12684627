//! Python sessions forked from a zygote (see [`ampoule_runtime::zygote`]).
//!
//! [`start_python`] starts a zygote that has imported the kernel and the pool's packages;
//! [`Session::start_forked`] turns one fork of it into a session. A session born this way has
//! the same layers and limits as one started from scratch, answers the same protocol and is
//! ready in milliseconds with numpy, pandas and matplotlib already imported.

use ampoule_runtime::{Host, SandboxConfig, Zygote, ZygoteConfig};
use ampoule_types::Limits;

use crate::error::Result;
use crate::language::{Kernel, KernelFile, Python, in_sandbox};
use crate::session::{SESSION_CPU_BACKSTOP_S, Session};

const ZYGOTE: KernelFile = KernelFile {
    name: "zygote.py",
    contents: include_str!("../../../kernels/python/zygote.py"),
};

/// What a Python zygote imports unless told otherwise.
pub const DEFAULT_PRELOAD: &[&str] = &["numpy", "pandas", "matplotlib", "matplotlib.pyplot"];

/// Thread pools of numeric libraries must not exist when a process forks (a child would
/// inherit locks held by threads it does not have): one thread each, in the zygote and its
/// children.
const SINGLE_THREADED: &[(&str, &str)] = &[
    ("OPENBLAS_NUM_THREADS", "1"),
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("NUMEXPR_NUM_THREADS", "1"),
];

/// The environment of Python sessions (and of the zygote).
fn python_env() -> Result<(crate::LanguageSpec, Vec<(String, String)>)> {
    let spec = Python.locate(&Limits::default())?;
    let mut cfg = SandboxConfig::new(Vec::new());
    let pairs = spec.env.iter().cloned().chain(
        SINGLE_THREADED
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into())),
    );
    for (key, value) in pairs {
        match cfg.env.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => cfg.env.push((key, value)),
        }
    }
    Ok((spec, cfg.env))
}

/// Starts a Python zygote that imports `preload` (see [`DEFAULT_PRELOAD`]); modules that fail
/// to import are listed in [`Zygote::info`], not an error. Root only.
pub async fn start_python(host: &Host, preload: &[String]) -> Result<Zygote> {
    let (spec, env) = python_env()?;
    let python = spec.argv.first().cloned().unwrap_or_default();
    let mut cfg = SandboxConfig::new(vec![python, in_sandbox(ZYGOTE.name)]);
    cfg.env = env;
    cfg.ro_binds.clone_from(&spec.ro_binds);
    cfg.limits = Limits {
        // Not a real bound: besides its own imports, the zygote's cgroup is charged with the
        // old copies of every page it touches after a fork while children still share them
        // (a few MiB per live child: 1,000 children took more than 2 GiB). Those pages are
        // the children's, counted in their PSS; the host bounds them, through each pool's
        // `max_sessions`.
        timeout_s: SESSION_CPU_BACKSTOP_S,
        memory_mib: 1 << 20,
        pids: 1024,
        disk_mib: 64,
        ..Limits::default()
    };
    let files = spec
        .files
        .iter()
        .chain(std::iter::once(&ZYGOTE))
        .map(|f| (f.name.to_owned(), f.contents.as_bytes().to_vec()))
        .collect();
    Ok(Zygote::start(
        host,
        &ZygoteConfig {
            sandbox: cfg,
            files,
            preload: preload.to_vec(),
        },
    )
    .await?)
}

impl Session {
    /// A Python session forked from `zygote` (see [`start_python`]), with `limits`
    /// (`limits.timeout_s` is the default per-execution timeout).
    pub async fn start_forked(host: &Host, zygote: &Zygote, limits: Limits) -> Result<Self> {
        let (_, env) = python_env()?;
        let mut cfg = SandboxConfig::new(Vec::new());
        cfg.env = env;
        cfg.stdin = true;
        cfg.limits = Limits {
            timeout_s: SESSION_CPU_BACKSTOP_S,
            ..limits.clone()
        };
        let sandbox = zygote.spawn(host, &cfg, |_| Ok(())).await?;
        Self::handshake(sandbox, "python", limits).await
    }
}
