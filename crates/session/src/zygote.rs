//! Python sessions forked from a zygote (see [`ampoule_runtime::zygote`]).
//!
//! [`start_python`] starts a zygote that has imported the kernel and the pool's packages;
//! [`Session::start_forked`] turns one fork of it into a session. A session born this way has
//! the same layers and limits as one started from scratch, answers the same protocol and is
//! ready in milliseconds with numpy, pandas and matplotlib already imported.
//!
//! A zygote keeps the modules it imported for its whole life, so its children never see a
//! package installed or upgraded after it started: whoever runs zygotes records
//! [`python_env_fingerprint`] before [`start_python`] and replaces the zygote when it differs.

use ampoule_runtime::{Host, SandboxConfig, Zygote, ZygoteConfig};
use ampoule_types::{Language, Limits};

use crate::error::Result;
use crate::language::image::ImageRoot;
use crate::language::{Kernel, KernelFile, Python, in_sandbox};
use crate::network::SessionNetwork;
use crate::session::{Session, sandbox_config};
use crate::setup::{EnvFingerprint, PythonEnv};

const ZYGOTE: KernelFile = KernelFile {
    name: "zygote.py",
    contents: include_str!("../../../kernels/python/zygote.py"),
};

/// What a Python zygote imports unless told otherwise.
pub const DEFAULT_PRELOAD: &[&str] = &["numpy", "pandas", "matplotlib", "matplotlib.pyplot"];

/// What a Python zygote runs after its imports, before it freezes its heap, unless the pool
/// says otherwise (`[pools.X] warmup`): a first DataFrame, array and chart, in miniature, so
/// the lazy imports, caches and allocations of a session's first real cell are made once and
/// shared copy-on-write by every session instead of copied by each. Every step is optional (a
/// library that is absent is skipped), single-threaded (no BLAS call) and leaves no state: its
/// namespace is dropped before the freeze.
pub const DEFAULT_WARMUP: &str = r#"
try:
    import pandas as pd
    df = pd.DataFrame({"a": range(100), "b": [i / 2 for i in range(100)], "c": ["x", "y"] * 50})
    df.a.sum(); df.b.mean(); df.describe(); repr(df); df._repr_html_(); df.head().to_csv()
    df.groupby("c").a.sum(); df[df.a > 50].shape; df.sort_values("b").iloc[0]
    pd.Series([1.5, 2.5]).astype(int).tolist()
except Exception:
    pass
try:
    import numpy as np
    a = np.arange(100, dtype=float).reshape(10, 10)
    a.sum(); a.mean(axis=0); repr(a); np.random.default_rng(0).random(3); np.linspace(0, 1, 5)
except Exception:
    pass
try:
    import io
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1, 4, 9]); ax.set_title("warm-up"); ax.legend(["x"])
    fig.savefig(io.BytesIO(), format="png")
    plt.close("all")
except Exception:
    pass
"#;

/// Thread pools of numeric libraries must not exist when a process forks (a child would
/// inherit locks held by threads it does not have): one thread each, in the zygote and its
/// children.
const SINGLE_THREADED: &[(&str, &str)] = &[
    ("OPENBLAS_NUM_THREADS", "1"),
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("NUMEXPR_NUM_THREADS", "1"),
    // pyarrow's bundled jemalloc (imported by pandas) otherwise starts a background thread.
    ("JE_ARROW_MALLOC_CONF", "background_thread:false"),
];

/// The sandbox of a Python session (and of the zygote): the plug-in's (the host's Python, or
/// the interpreter of `image`), single-threaded.
fn python_config(
    limits: &Limits,
    image: Option<&ImageRoot>,
) -> Result<(crate::LanguageSpec, SandboxConfig)> {
    let spec = match image {
        Some(image) => crate::language::image::locate(Language::Python, image, limits)?,
        None => Python.locate(limits)?,
    };
    let mut cfg = sandbox_config(&spec, limits);
    set_env(&mut cfg, SINGLE_THREADED);
    Ok((spec, cfg))
}

/// `vars` in `cfg`'s environment, replacing what it had under their names.
fn set_env(cfg: &mut SandboxConfig, vars: &[(&str, &str)]) {
    for (key, value) in vars {
        cfg.env.retain(|(k, _)| k != key);
        cfg.env.push(((*key).into(), (*value).into()));
    }
}

/// The fingerprint of the Python environment [`start_python`] starts from (the `ampoule setup`
/// environment, or its absence: see [`PythonEnv::fingerprint`]). A few `stat` calls and two
/// small directory reads.
pub fn python_env_fingerprint() -> Result<EnvFingerprint> {
    PythonEnv::default_location().fingerprint()
}

/// Whether a child's first write to a huge page it shares with the zygote copies 4 KiB, not
/// 2 MiB: Linux 5.8 and later split the huge page instead of copying it whole. Before that a
/// huge-page heap would cost every session megabytes at its first writes.
pub fn huge_pages_split_on_write() -> bool {
    let Ok(uts) = nix::sys::utsname::uname() else {
        return false;
    };
    let release = uts.release().to_string_lossy();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (5, 8)
}

/// The memory of a zygote's cgroup for its own interpreter and imports, its spare and the probe
/// that learns a session's first pages.
pub const ZYGOTE_BASE_MIB: u64 = 1_024;
/// The memory a zygote's cgroup keeps for each live child: its pid 1 (the reaper), what its
/// spare allocated before the request (page tables, namespaces, the learnt pages it copied
/// ahead: at most 8 MiB), and the zygote's copies of pages it touched after the fork while
/// the child still shares the originals. Measured: see docs/BENCHMARKS.md ("zygote budget").
pub const ZYGOTE_MIB_PER_CHILD: u64 = 12;

/// The explicit budget of a zygote's cgroup for `max_children` live sessions: memory (MiB) and
/// processes (itself, its spare with that one's pid 1, the probe, and each child's pid 1).
pub fn zygote_budget(max_children: u64) -> (u64, u64) {
    (
        ZYGOTE_BASE_MIB.saturating_add(max_children.saturating_mul(ZYGOTE_MIB_PER_CHILD)),
        max_children.saturating_add(16),
    )
}

/// Starts a Python zygote that imports `preload` (see [`DEFAULT_PRELOAD`]) for at most
/// `max_children` live sessions (its cgroup's budget, [`zygote_budget`]); modules that fail to
/// import are listed in [`Zygote::info`], not an error. Root only.
pub async fn start_python(host: &Host, preload: &[String], max_children: u64) -> Result<Zygote> {
    start_python_in(host, preload, DEFAULT_WARMUP, max_children, None).await
}

/// [`start_python`] with the interpreter of `image` (a pool from an image: the zygote's root
/// is the image's, and so is every child's); `None`: the host's. `warmup` is Python code run
/// after the imports, before the heap is frozen ([`DEFAULT_WARMUP`]; empty: none).
pub async fn start_python_in(
    host: &Host,
    preload: &[String],
    warmup: &str,
    max_children: u64,
    image: Option<&ImageRoot>,
) -> Result<Zygote> {
    start_python_with(host, preload, warmup, max_children, image, false).await
}

/// [`start_python_in`] for a pool with a network whose gateway terminates TLS (credential
/// injection) when `trust_gateway_ca`: its children trust the gateway's CA as a cold session
/// does (see [`ampoule_runtime::ZygoteConfig::trust_gateway_ca`]). The zygote itself has no
/// network either way.
pub async fn start_python_with(
    host: &Host,
    preload: &[String],
    warmup: &str,
    max_children: u64,
    image: Option<&ImageRoot>,
    trust_gateway_ca: bool,
) -> Result<Zygote> {
    let (memory_mib, pids) = zygote_budget(max_children);
    let (spec, mut cfg) = python_config(
        &Limits {
            memory_mib,
            pids,
            disk_mib: 64,
            ..Limits::default()
        },
        image,
    )?;
    // The zygote's objects in one heap of 2 MiB pages (see `collapse_heap` in zygote.py): a
    // fork then copies a few dozen page-table entries instead of ~20,000. The children's own
    // environment is the session's (set by the child), without these.
    if huge_pages_split_on_write() {
        set_env(
            &mut cfg,
            &[
                ("PYTHONMALLOC", "malloc"),
                ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),
            ],
        );
    }
    let python = spec.argv.first().cloned().unwrap_or_default();
    cfg.argv = vec![python, in_sandbox(ZYGOTE.name)];
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
            warmup: warmup.to_owned(),
            max_children,
            trust_gateway_ca,
        },
    )
    .await?)
}

impl Session {
    /// A Python session forked from `zygote` (see [`start_python`]), with `limits`
    /// (`limits.timeout_s` is the default per-execution timeout).
    pub async fn start_forked(host: &Host, zygote: &Zygote, limits: Limits) -> Result<Self> {
        Self::start_forked_in(host, zygote, limits, None).await
    }

    /// [`Session::start_forked`] from a zygote of `image` (see [`start_python_in`]): the
    /// child's environment is the image's.
    pub async fn start_forked_in(
        host: &Host,
        zygote: &Zygote,
        limits: Limits,
        image: Option<&ImageRoot>,
    ) -> Result<Self> {
        Self::start_forked_with(host, zygote, limits, image, None).await
    }

    /// [`Session::start_forked_in`] with a network: the child is wired to its own egress
    /// gateway exactly as a cold session of [`Session::start_with`] is (same link, resolver,
    /// trust and environment; see [`ampoule_runtime::Zygote::spawn_with`]). A zygote whose
    /// children trust the gateway's CA is started with [`start_python_with`]`(…, true)`.
    pub async fn start_forked_with(
        host: &Host,
        zygote: &Zygote,
        limits: Limits,
        image: Option<&ImageRoot>,
        network: Option<SessionNetwork>,
    ) -> Result<Self> {
        let (_, mut cfg) = python_config(&limits, image)?;
        let Some(net) = network else {
            let sandbox = zygote.spawn(host, &cfg, |_| Ok(())).await?;
            return Self::handshake(sandbox, "python", limits).await;
        };
        net.configure(&mut cfg);
        let mut gateway = None;
        let sandbox = zygote
            .spawn_with(host, &cfg, |p| {
                gateway = Some(net.start_gateway(&p)?);
                Ok(())
            })
            .await?;
        let mut session = Self::handshake(sandbox, "python", limits).await?;
        session.gateway = gateway;
        Ok(session)
    }
}
