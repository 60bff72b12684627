//! `ampoule audit`: the operator's view of the audit log, read straight from the store the
//! server's config names (`[audit] url`, else SQLite in the data directory). `ampoule audit
//! verify` walks the hash chain and exits non-zero when a record was edited or removed.

use std::path::PathBuf;
use std::process::ExitCode;

use ampoule_audit::{AuditStore, Filter, Kind, SqlStore};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Args)]
pub(crate) struct AuditArgs {
    /// The server's TOML config (where the audit store is).
    #[arg(long, value_name = "FILE", env = "AMPOULE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    action: Option<Action>,
    /// The tenant whose records to list.
    #[arg(long)]
    tenant: Option<String>,
    /// Only this session id.
    #[arg(long)]
    session: Option<String>,
    /// Only this status (succeeded, failed, timed_out, killed).
    #[arg(long)]
    status: Option<String>,
    /// Only this language.
    #[arg(long)]
    language: Option<String>,
    /// From this time on, milliseconds since the Unix epoch.
    #[arg(long)]
    since: Option<i64>,
    /// Before this time, milliseconds since the Unix epoch.
    #[arg(long)]
    until: Option<i64>,
    /// Most records.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Action {
    /// Check the hash chain: detects edited, inserted and deleted records.
    Verify,
}

pub(crate) async fn run(args: AuditArgs) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => ampoule_server::Config::load(path)?,
        None => ampoule_server::Config::default(),
    };
    let url = ampoule_server::serve::audit_url(&cfg);
    let store = SqlStore::open(&url)
        .await
        .with_context(|| "opening the audit store")?;
    if let Some(Action::Verify) = args.action {
        let v = store.verify().await?;
        return Ok(match v.broken {
            None => {
                println!("ok: {} records, chain intact", v.checked);
                ExitCode::SUCCESS
            }
            Some(why) => {
                println!("broken after {} good records: {why}", v.checked);
                ExitCode::from(1)
            }
        });
    }
    let tenant = args
        .tenant
        .context("--tenant is required to list records (each tenant's log is its own)")?;
    let page = store
        .query(&Filter {
            tenant,
            session: args.session,
            since_ms: args.since,
            until_ms: args.until,
            status: args.status,
            language: args.language,
            kind: None,
            after: None,
            limit: Some(args.limit),
            ..Filter::default()
        })
        .await?;
    if args.json {
        for r in &page.records {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:>6}  {:>13}  {:<16}  {:<28}  {:<10}  {:>9}  DECIDED",
            "SEQ", "TIME_MS", "KIND", "SESSION", "STATUS", "MS"
        );
        for r in &page.records {
            let x = &r.record;
            println!(
                "{:>6}  {:>13}  {:<16}  {:<28}  {:<10}  {:>9}  {}",
                r.seq,
                x.time_ms,
                x.kind.as_str(),
                x.session,
                x.status.as_deref().unwrap_or("-"),
                x.duration_ms.map_or("-".into(), |d| format!("{d:.0}")),
                x.decided_by
                    .as_deref()
                    .unwrap_or(if x.kind == Kind::Execution { "" } else { "-" }),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
