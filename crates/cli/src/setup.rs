//! `ampoule setup`: builds or refreshes the environments sessions run in (today the Python
//! one: a virtual environment with the pinned packages of `kernels/python/requirements.txt`),
//! with a progress bar on stderr. Idempotent: nothing runs when every pin is installed.
//! `--list` prints the installed packages (data, on stdout); `--check` only reports.

use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use ampoule_session::setup::{self, PythonEnv, SetupEvent, SetupOutcome};
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub(crate) struct SetupArgs {
    /// Print the packages of the Python environment (`name==version`) and change nothing.
    #[arg(long)]
    list: bool,
    /// With --list: print them as JSON.
    #[arg(long, requires = "list")]
    json: bool,
    /// Only check: exit 1 when the environment is missing or differs from the pins.
    #[arg(long, conflicts_with = "list")]
    check: bool,
    /// The CPython to build the environment with (default: the host's `python3`, or the one
    /// an existing environment was built with). CPython 3.12 or newer makes zygote pools
    /// denser: their shared objects are made immortal, so sessions stop copying the pages
    /// that hold them.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["list", "check"])]
    python: Option<std::path::PathBuf>,
}

pub(crate) fn run(args: SetupArgs) -> Result<ExitCode> {
    let env = PythonEnv::default_location();
    if args.list {
        if !env.exists() {
            anyhow::bail!(
                "no Python environment at {}\nhint: run `ampoule setup`",
                env.dir().display()
            );
        }
        let packages = env.packages()?;
        let mut out = std::io::stdout().lock();
        if args.json {
            serde_json::to_writer_pretty(&mut out, &packages)?;
            writeln!(out)?;
        } else {
            for p in &packages {
                writeln!(out, "{}=={}", p.name, p.version)?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.check {
        let outdated = env.outdated()?;
        if outdated.is_empty() {
            eprintln!("python environment {} is up to date", env.dir().display());
            return Ok(ExitCode::SUCCESS);
        }
        for line in &outdated {
            eprintln!("not as pinned: {line}");
        }
        eprintln!("hint: run `ampoule setup`");
        return Ok(ExitCode::FAILURE);
    }

    let python = match args.python {
        Some(path) => {
            std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))?
        }
        None => match env.base_interpreter().filter(|p| p.exists()) {
            Some(built_with) if env.exists() => built_with,
            _ => {
                ampoule_runtime::Interpreter::find(ampoule_types::Language::Python)
                    .context("finding the host's Python 3")?
                    .path
            }
        },
    };
    let pins: HashSet<String> = setup::requirements().into_iter().map(|r| r.name).collect();
    let bar = ProgressBar::new(pins.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} python [{bar:30}] {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("checking {}", env.dir().display()));
    let outcome = setup::setup_python(&env, &python, &mut |event| match event {
        SetupEvent::CreatingEnv => bar.set_message("creating the virtual environment"),
        SetupEvent::Resolving { total } => {
            bar.set_length(total as u64);
            bar.set_message("resolving the pinned packages");
        }
        SetupEvent::Collected { name } => {
            if pins.contains(&name) {
                bar.inc(1);
            }
            bar.set_message(format!("collected {name}"));
        }
        SetupEvent::Installing { count } => {
            bar.set_position(bar.length().unwrap_or(0));
            bar.set_message(format!("installing {count} packages"));
        }
        SetupEvent::Verifying => bar.set_message("verifying"),
    });
    bar.finish_and_clear();
    let outcome = outcome.with_context(|| format!("setting up {}", env.dir().display()))?;
    let what = match outcome {
        SetupOutcome::UpToDate => "is up to date",
        SetupOutcome::Installed => "is ready",
    };
    eprintln!(
        "python environment {} {what} ({} pinned packages; list them with `ampoule setup --list`)",
        env.dir().display(),
        pins.len()
    );
    Ok(ExitCode::SUCCESS)
}
