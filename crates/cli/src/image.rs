//! `ampoule image import|pull|ls|rm`: the image store under the data directory
//! (`ampoule_image`). Data (the list, the digest of what was imported or pulled) on stdout;
//! progress and notes on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use ampoule_image::registry::{self, Event, PullOptions};
use ampoule_image::{ImageName, Reference, Report, Store, import};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub(crate) struct ImageArgs {
    /// The data directory holding the store (`images/` in it); default: `$AMPOULE_DATA_DIR`,
    /// `/var/lib/ampoule` for root, else `~/.local/share/ampoule`. `serve` reads the same one
    /// (its `[server] data_dir`).
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import an OCI image layout directory or a `docker save` archive.
    Import {
        /// The layout directory or the archive.
        path: PathBuf,
        /// The image's name in the store, `NAME[:TAG]` (a pool's `image = "NAME:TAG"`).
        #[arg(long, value_name = "NAME[:TAG]")]
        name: String,
    },
    /// Pull an image from a registry (OCI distribution protocol, HTTPS).
    Pull {
        /// `HOST[:PORT]/REPO[:TAG|@DIGEST]`.
        reference: String,
        /// Name in the store (default: the reference).
        #[arg(long, value_name = "NAME[:TAG]")]
        name: Option<String>,
        /// Plain HTTP, for a registry on loopback only.
        #[arg(long)]
        insecure: bool,
        /// A Docker-style `config.json` with the registry's credentials (`auths`).
        #[arg(long, value_name = "FILE")]
        credentials: Option<PathBuf>,
    },
    /// List the images in the store.
    Ls {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove images by name; layers no other image uses are deleted.
    Rm {
        /// `NAME[:TAG]`, one or more.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub(crate) async fn run(args: ImageArgs) -> Result<ExitCode> {
    let data_dir = args
        .data_dir
        .unwrap_or_else(ampoule_session::paths::data_dir);
    let store = Store::open(&data_dir)?;
    match args.command {
        ImageCommand::Import { path, name } => {
            let name = ImageName::parse(&name)?;
            let lock = store.lock()?;
            let spinner = spinner(&format!("importing {}", path.display()));
            let done = import::import(&store, &lock, &path, &name);
            spinner.finish_and_clear();
            let done = done.with_context(|| format!("importing {}", path.display()))?;
            finish(&done.image, done.report.as_ref());
        }
        ImageCommand::Pull {
            reference,
            name,
            insecure,
            credentials,
        } => {
            let reference = Reference::parse(&reference)?;
            let name = match name {
                Some(n) => ImageName::parse(&n)?,
                None => reference.local_name(),
            };
            let credentials = match credentials {
                Some(file) => Some(
                    registry::credentials_from_file(&file, &reference.registry)?.with_context(
                        || format!("{} has no entry for {}", file.display(), reference.registry),
                    )?,
                ),
                None => None,
            };
            let options = PullOptions {
                insecure,
                credentials,
            };
            let lock = store.lock()?;
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(format!("pulling {name}"));
            let mut progress = |e: Event| match e {
                Event::Manifest { total, .. } => bar.set_length(total),
                Event::Cached(n) | Event::Bytes(n) => bar.inc(n),
                Event::Unpacking => bar.set_message("unpacking"),
            };
            let done =
                registry::pull(&store, &lock, &reference, &name, &options, &mut progress).await;
            bar.finish_and_clear();
            let done = done.with_context(|| format!("pulling {}", reference_str(&reference)))?;
            finish(&done.image, done.report.as_ref());
        }
        ImageCommand::Ls { json } => {
            let images = store.list()?;
            let mut out = std::io::stdout().lock();
            if json {
                let list: Vec<serde_json::Value> = images
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "name": i.name,
                            "digest": i.manifest.to_string(),
                            "layers": i.layers.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "size": i.size,
                            "created": i.created,
                            "rootfs": store.rootfs(i),
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                writeln!(
                    out,
                    "{:<40} {:<14} {:>10}  CREATED",
                    "NAME", "DIGEST", "SIZE"
                )?;
                for i in &images {
                    writeln!(
                        out,
                        "{:<40} {:<14} {:>10}  {}",
                        i.name,
                        i.manifest.short(),
                        human(i.size),
                        i.created.as_deref().unwrap_or("-")
                    )?;
                }
            }
        }
        ImageCommand::Rm { names } => {
            let lock = store.lock()?;
            for n in names {
                let r = store.remove(&lock, &n)?;
                eprintln!(
                    "ampoule: removed {n} ({} blobs and {} unpacked roots no other image used)",
                    r.blobs, r.roots
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn reference_str(r: &Reference) -> String {
    format!("{}/{}:{}", r.registry, r.repo, r.target_str())
}

fn spinner(msg: &str) -> ProgressBar {
    let s = ProgressBar::new_spinner();
    s.set_message(msg.to_owned());
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}

/// The digest on stdout (data), what unpacking did on stderr.
fn finish(image: &ampoule_image::Image, report: Option<&Report>) {
    let _ = writeln!(std::io::stdout().lock(), "{}", image.manifest);
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "ampoule: {} is {} ({} layers, {})",
        image.name,
        image.manifest.short(),
        image.layers.len(),
        human(image.size)
    );
    if let Some(r) = report {
        if r.dropped_count > 0 {
            let _ = writeln!(
                err,
                "ampoule: dropped {} device nodes, FIFOs or sockets ({})",
                r.dropped_count,
                r.dropped.join(", ")
            );
        }
        if r.setid_cleared > 0 {
            let _ = writeln!(
                err,
                "ampoule: cleared setuid/setgid bits of {} files",
                r.setid_cleared
            );
        }
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
