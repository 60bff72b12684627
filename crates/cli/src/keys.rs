//! `ampoule keys`: API keys without a restart. Edits the keys file the server's config names
//! (`[auth] keys_file`, else `keys.toml` in the data directory); a running server reads it
//! again within a second. A new key is printed once, on stdout, and stored only as its
//! SHA-256; everything else names keys by their id (the digest's first 12 hex digits).

use std::path::PathBuf;
use std::process::ExitCode;

use ampoule_server::auth::keyfile::{KeyFile, Minted, StoredKey};
use ampoule_server::auth::unix_now;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Args)]
pub(crate) struct KeysArgs {
    /// The server's TOML config (where the keys file is).
    #[arg(long, value_name = "FILE", env = "AMPOULE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Mint a key for a tenant; the key is printed once on stdout.
    Add {
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// A name for people (`ci`, `laptop`).
        #[arg(long)]
        name: Option<String>,
        /// Expire after this long (`90s`, `15m`, `24h`, `30d`); default: never.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<u64>,
        /// `approver`: the key decides approvals of its tenant (`/v1/approvals`) and submits
        /// no work.
        #[arg(long, value_parser = ["approver"])]
        role: Option<String>,
    },
    /// List the keys (ids, tenants, states; never the keys).
    List,
    /// Revoke a key: it answers 401 `key_revoked` from the server's next look (within a
    /// second).
    Revoke {
        /// The key's id.
        id: String,
    },
    /// Replace a key by a new one for the same tenant; the old one keeps working for the
    /// grace period, then answers 401 `key_expired`.
    Rotate {
        /// The key's id.
        id: String,
        /// How long the old key keeps working (`0s` for not at all).
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
        grace: u64,
        /// The new key expires after this long; default: never.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<u64>,
    },
}

/// Seconds in `90s`, `15m`, `24h`, `30d` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 90s, 15m, 24h or 30d"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("{s:?} is too long"))
}

pub(crate) fn run(args: KeysArgs) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => ampoule_server::Config::load(path)?,
        None => ampoule_server::Config::default(),
    };
    let path = cfg.keys_file();
    let now = unix_now();
    let edit = |f: &dyn Fn(&mut KeyFile) -> Result<Minted, ampoule_server::Error>| {
        KeyFile::edit(&path, f).with_context(|| format!("editing {}", path.display()))
    };
    match args.action {
        Action::Add {
            tenant,
            name,
            expires_in,
            role,
        } => {
            if tenant.trim().is_empty() {
                bail!("--tenant is empty");
            }
            let minted = edit(&|f| {
                let mut m = f.add(
                    &tenant,
                    name.clone(),
                    expires_in.map(|s| now.saturating_add(s)),
                    now,
                )?;
                m.stored.role = role.clone();
                if let Some(k) = f.keys.iter_mut().find(|k| k.id == m.stored.id) {
                    k.role = role.clone();
                }
                Ok(m)
            })?;
            print_minted(&minted, args.json, &path, None);
        }
        Action::Rotate {
            id,
            grace,
            expires_in,
        } => {
            let minted =
                edit(&|f| f.rotate(&id, grace, expires_in.map(|s| now.saturating_add(s)), now))?;
            print_minted(&minted, args.json, &path, Some(now.saturating_add(grace)));
        }
        Action::Revoke { id } => {
            let k = KeyFile::edit(&path, |f| f.revoke(&id, now))
                .with_context(|| format!("editing {}", path.display()))?;
            if args.json {
                println!("{}", serde_json::json!({"id": k.id, "state": k.state(now)}));
            } else {
                eprintln!("revoked key {} of tenant {}", k.id, k.tenant);
            }
        }
        Action::List => {
            let file = KeyFile::load(&path)?;
            if args.json {
                for k in &file.keys {
                    println!("{}", key_json(k, now));
                }
            } else {
                println!(
                    "{:<12}  {:<16}  {:<10}  {:<16}  {:<20}  {:<20}",
                    "ID", "TENANT", "STATE", "NAME", "CREATED", "EXPIRES"
                );
                for k in &file.keys {
                    println!(
                        "{:<12}  {:<16}  {:<10}  {:<16}  {:<20}  {:<20}",
                        k.id,
                        k.tenant,
                        k.state(now),
                        k.name.as_deref().unwrap_or("-"),
                        utc(k.created_at),
                        k.expires_at.map_or_else(|| "never".to_owned(), utc),
                    );
                }
                if file.keys.is_empty() {
                    eprintln!(
                        "no keys in {} (`ampoule keys add --tenant T`)",
                        path.display()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn key_json(k: &StoredKey, now: u64) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "tenant": k.tenant,
        "name": k.name,
        "state": k.state(now),
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
        "replaces": k.replaces,
        "replaced_by": k.replaced_by,
        "role": k.role,
    })
}

fn print_minted(m: &Minted, json: bool, path: &std::path::Path, old_until: Option<u64>) {
    if json {
        let mut v = key_json(&m.stored, unix_now());
        v["key"] = serde_json::Value::String(m.key.clone());
        println!("{v}");
        return;
    }
    println!("{}", m.key);
    eprintln!(
        "key {} for tenant {} (shown once: store it now; {} keeps only its SHA-256)",
        m.stored.id,
        m.stored.tenant,
        path.display()
    );
    if let Some(e) = m.stored.expires_at {
        eprintln!("expires {}", utc(e));
    }
    if let (Some(old), Some(until)) = (&m.stored.replaces, old_until) {
        eprintln!("the old key {old} keeps working until {}", utc(until));
    }
}

/// `YYYY-MM-DD HH:MM UTC` for seconds since the epoch. Hand-written (the civil-from-days
/// conversion of H. Hinnant's date algorithms) to print a date without a date crate.
fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("24h"), Ok(86_400));
        assert_eq!(parse_duration("30d"), Ok(2_592_000));
        assert_eq!(parse_duration("42"), Ok(42));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_796_472_000), "2026-12-05 12:00 UTC");
        assert_eq!(utc(951_825_600), "2000-02-29 12:00 UTC");
    }
}
