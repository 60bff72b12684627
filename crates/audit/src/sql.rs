//! [`SqlStore`]: the audit store on SQLite or PostgreSQL. The SQL is written once with `$n`
//! placeholders (SQLite reads them as `?n`); only row locking differs (`FOR UPDATE` on
//! PostgreSQL, where several servers may share one database; SQLite serializes writers).

use std::path::Path;
use std::str::FromStr;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::record::link;
use crate::{AuditStore, Error, Filter, Page, Record, StoredRecord, Usage, Verification};

enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The audit store on SQLite or PostgreSQL.
pub struct SqlStore {
    backend: Backend,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        };
        f.debug_struct("SqlStore").field("backend", &kind).finish()
    }
}

/// Runs `$body` with `$p` bound to the pool, `$pg` telling which backend it is.
macro_rules! on {
    ($self:expr, $p:ident, $pg:ident => $body:expr) => {
        match &$self.backend {
            Backend::Sqlite($p) => {
                #[allow(unused_variables)]
                let $pg = false;
                $body
            }
            Backend::Postgres($p) => {
                #[allow(unused_variables)]
                let $pg = true;
                $body
            }
        }
    };
}

/// The SQL for the backend: `$n` placeholders become `?n` on SQLite.
fn sql(pg: bool, s: &str) -> String {
    if pg {
        s.to_owned()
    } else {
        s.replace('$', "?")
    }
}

enum Bind {
    I(i64),
    S(String),
}

const COLUMNS: &str = "seq, time_ms, tenant, kind, pool, session, status, language, duration_ms, \
                       cpu_time_ms, peak_memory_bytes, execution, identifier, request_id, run_id, \
                       body, prev_hash, hash";

const INSERT_INTO: &str = "INSERT INTO audit_records (seq, time_ms, tenant, kind, pool, session, \
                           status, language, duration_ms, cpu_time_ms, peak_memory_bytes, \
                           execution, identifier, request_id, run_id, body, prev_hash, hash) ";

/// Rows per `INSERT` statement: 18 parameters each, well under SQLite's limit of 32,766
/// parameters per statement and PostgreSQL's 65,535.
const ROWS_PER_INSERT: usize = 128;

/// The columns of one row, as read back.
struct Row_ {
    seq: i64,
    time_ms: i64,
    tenant: String,
    kind: String,
    pool: String,
    session: String,
    status: Option<String>,
    language: Option<String>,
    duration_ms: Option<f64>,
    cpu_time_ms: Option<f64>,
    peak_memory_bytes: Option<i64>,
    execution: Option<String>,
    identifier: Option<String>,
    request_id: Option<String>,
    run_id: Option<String>,
    body: String,
    prev_hash: String,
    hash: String,
}

macro_rules! read_row {
    ($r:expr) => {
        Row_ {
            seq: $r.try_get("seq")?,
            time_ms: $r.try_get("time_ms")?,
            tenant: $r.try_get("tenant")?,
            kind: $r.try_get("kind")?,
            pool: $r.try_get("pool")?,
            session: $r.try_get("session")?,
            status: $r.try_get("status")?,
            language: $r.try_get("language")?,
            duration_ms: $r.try_get("duration_ms")?,
            cpu_time_ms: $r.try_get("cpu_time_ms")?,
            peak_memory_bytes: $r.try_get("peak_memory_bytes")?,
            execution: $r.try_get("execution")?,
            identifier: $r.try_get("identifier")?,
            request_id: $r.try_get("request_id")?,
            run_id: $r.try_get("run_id")?,
            body: $r.try_get("body")?,
            prev_hash: $r.try_get("prev_hash")?,
            hash: $r.try_get("hash")?,
        }
    };
}

/// Equal up to the last bits a JSON round trip may change (serde_json parses floats to
/// within one unit in the last place).
fn same(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
        _ => false,
    }
}

impl Row_ {
    fn record(&self) -> Result<Record, Error> {
        serde_json::from_str(&self.body).map_err(|_| Error::Corrupt { seq: self.seq })
    }

    /// Whether the indexed columns say what the hashed body says.
    fn columns_match(&self, r: &Record) -> bool {
        self.time_ms == r.time_ms
            && self.tenant == r.tenant
            && self.kind == r.kind.as_str()
            && self.pool == r.pool
            && self.session == r.session
            && self.status == r.status
            && self.language == r.language
            && same(self.duration_ms, r.duration_ms)
            && same(self.cpu_time_ms, r.cpu_time_ms)
            && self.peak_memory_bytes == r.peak_memory_bytes
            && self.execution == r.execution
            && self.identifier == r.identifier
            && self.request_id == r.request_id
            && self.run_id == r.run_id
    }

    fn stored(self) -> Result<StoredRecord, Error> {
        Ok(StoredRecord {
            seq: self.seq,
            record: self.record()?,
            prev_hash: self.prev_hash,
            hash: self.hash,
        })
    }
}

impl SqlStore {
    /// Opens (creating and migrating) the store at `url`: `sqlite://PATH` or
    /// `postgres://…` / `postgresql://…`.
    pub async fn open(url: &str) -> Result<Self, Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::postgres(PgConnectOptions::from_str(url)?).await
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Self::sqlite(Path::new(path)).await
        } else {
            Err(Error::UnsupportedUrl)
        }
    }

    /// The embedded store: a SQLite file (created when missing) in WAL mode.
    pub async fn sqlite(path: &Path) -> Result<Self, Error> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqlStore {
            backend: Backend::Sqlite(pool),
        })
    }

    /// The store on PostgreSQL.
    pub async fn postgres(opts: PgConnectOptions) -> Result<Self, Error> {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(SqlStore {
            backend: Backend::Postgres(pool),
        })
    }

    /// Changes stored rows behind the API's back. For tamper tests only: `sql` runs as is.
    #[doc(hidden)]
    pub async fn raw_execute(&self, statement: &str) -> Result<u64, Error> {
        on!(self, p, _pg => Ok(sqlx::query(statement).execute(p).await?.rows_affected()))
    }
}

#[async_trait::async_trait]
impl AuditStore for SqlStore {
    async fn admit_rate(
        &self,
        key: &str,
        max: u32,
        window_ms: i64,
        now_ms: i64,
    ) -> Result<crate::RateAdmission, Error> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(crate::RateAdmission::NotShared);
        };
        let mut tx = pool.begin().await?;
        // One key's events are counted by one transaction at a time, on every server.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM rate_events WHERE key = $1 AND at_ms <= $2")
            .bind(key)
            .bind(now_ms - window_ms)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(at_ms) AS oldest FROM rate_events WHERE key = $1",
        )
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        let n: i64 = row.try_get("n")?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        let answer = if n >= i64::from(max) {
            crate::RateAdmission::Refused {
                retry_after_ms: oldest.map_or(window_ms, |o| (o + window_ms - now_ms).max(1)),
            }
        } else {
            sqlx::query("INSERT INTO rate_events (key, at_ms) VALUES ($1, $2)")
                .bind(key)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            crate::RateAdmission::Admitted
        };
        tx.commit().await?;
        Ok(answer)
    }

    async fn append(&self, records: &[Record]) -> Result<(), Error> {
        if records.is_empty() {
            return Ok(());
        }
        on!(self, p, pg => {
            let mut tx = p.begin().await?;
            let head = if pg {
                "SELECT head_seq, head_hash FROM audit_chain WHERE id = 1 FOR UPDATE"
            } else {
                "SELECT head_seq, head_hash FROM audit_chain WHERE id = 1"
            };
            let row = sqlx::query(head).fetch_one(&mut *tx).await?;
            let mut seq: i64 = row.try_get("head_seq")?;
            let mut prev: String = row.try_get("head_hash")?;
            // The chain first (each hash covers the one before), then the rows, many to a
            // statement: every statement is a round trip to sqlx's SQLite worker thread, and
            // under a steady stream of executions a batch holds dozens of records.
            let mut linked = Vec::with_capacity(records.len());
            for r in records {
                seq += 1;
                let body = r.body();
                let hash = link(&prev, &body);
                linked.push((seq, r, body, std::mem::replace(&mut prev, hash.clone()), hash));
            }
            for rows in linked.chunks(ROWS_PER_INSERT) {
                let mut q = sqlx::QueryBuilder::new(INSERT_INTO);
                q.push_values(rows, |mut b, (seq, r, body, prev, hash)| {
                    b.push_bind(*seq)
                        .push_bind(r.time_ms)
                        .push_bind(&r.tenant)
                        .push_bind(r.kind.as_str())
                        .push_bind(&r.pool)
                        .push_bind(&r.session)
                        .push_bind(&r.status)
                        .push_bind(&r.language)
                        .push_bind(r.duration_ms)
                        .push_bind(r.cpu_time_ms)
                        .push_bind(r.peak_memory_bytes)
                        .push_bind(&r.execution)
                        .push_bind(&r.identifier)
                        .push_bind(&r.request_id)
                        .push_bind(&r.run_id)
                        .push_bind(body)
                        .push_bind(prev)
                        .push_bind(hash);
                });
                q.build().execute(&mut *tx).await?;
            }
            sqlx::query(&sql(pg, "UPDATE audit_chain SET head_seq = $1, head_hash = $2 WHERE id = 1"))
                .bind(seq)
                .bind(&prev)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    async fn query(&self, f: &Filter) -> Result<Page, Error> {
        let limit = i64::from(f.limit.unwrap_or(100).clamp(1, 1000));
        let mut binds = vec![Bind::S(f.tenant.clone())];
        let mut cond = String::from("tenant = $1");
        let mut add = |c: &str, b: Bind, binds: &mut Vec<Bind>| {
            binds.push(b);
            cond.push_str(&format!(" AND {c} ${}", binds.len()));
        };
        if let Some(s) = &f.session {
            add("session =", Bind::S(s.clone()), &mut binds);
        }
        if let Some(s) = &f.pool {
            add("pool =", Bind::S(s.clone()), &mut binds);
        }
        if let Some(s) = &f.identifier {
            add("identifier =", Bind::S(s.clone()), &mut binds);
        }
        if let Some(s) = &f.execution {
            add("execution =", Bind::S(s.clone()), &mut binds);
        }
        if let Some(s) = &f.run_id {
            add("run_id =", Bind::S(s.clone()), &mut binds);
        }
        if let Some(t) = f.since_ms {
            add("time_ms >=", Bind::I(t), &mut binds);
        }
        if let Some(t) = f.until_ms {
            add("time_ms <", Bind::I(t), &mut binds);
        }
        if let Some(s) = &f.status {
            add("status =", Bind::S(s.clone()), &mut binds);
        }
        if let Some(s) = &f.language {
            add("language =", Bind::S(s.clone()), &mut binds);
        }
        if let Some(k) = f.kind {
            add("kind =", Bind::S(k.as_str().to_owned()), &mut binds);
        }
        if let Some(a) = f.after {
            add("seq >", Bind::I(a), &mut binds);
        }
        binds.push(Bind::I(limit + 1));
        let text = format!(
            "SELECT {COLUMNS} FROM audit_records WHERE {cond} ORDER BY seq LIMIT ${}",
            binds.len()
        );
        let rows: Vec<Row_> = on!(self, p, pg => {
            let text = sql(pg, &text);
            let mut q = sqlx::query(&text);
            for b in &binds {
                q = match b {
                    Bind::I(v) => q.bind(*v),
                    Bind::S(v) => q.bind(v.as_str()),
                };
            }
            let mut out = Vec::new();
            for r in q.fetch_all(p).await? {
                out.push(read_row!(r));
            }
            out
        });
        let more = rows.len() as i64 > limit;
        let mut records = Vec::with_capacity(rows.len());
        for r in rows.into_iter().take(limit as usize) {
            records.push(r.stored()?);
        }
        let next = if more {
            records.last().map(|r| r.seq)
        } else {
            None
        };
        Ok(Page { records, next })
    }

    async fn verify(&self) -> Result<Verification, Error> {
        const PAGE: i64 = 5000;
        let (head_seq, head_hash, anchor_seq, anchor_hash): (i64, String, i64, String) = on!(self, p, _pg => {
            let r = sqlx::query(
                "SELECT head_seq, head_hash, anchor_seq, anchor_hash FROM audit_chain WHERE id = 1",
            )
            .fetch_one(p)
            .await?;
            (
                r.try_get("head_seq")?,
                r.try_get("head_hash")?,
                r.try_get("anchor_seq")?,
                r.try_get("anchor_hash")?,
            )
        });
        let mut checked = 0u64;
        let mut seq = anchor_seq;
        let mut prev = anchor_hash;
        let broken = |checked, why: String| {
            Ok(Verification {
                checked,
                broken: Some(why),
            })
        };
        loop {
            let rows: Vec<Row_> = on!(self, p, pg => {
                // Up to the head read above: records appended meanwhile (by this server's
                // writer, or another server's on a shared database) are the next walk's.
                let text = sql(pg, &format!(
                    "SELECT {COLUMNS} FROM audit_records WHERE seq > $1 AND seq <= $3 \
                     ORDER BY seq LIMIT $2"
                ));
                let mut out = Vec::new();
                for r in sqlx::query(&text)
                    .bind(seq)
                    .bind(PAGE)
                    .bind(head_seq)
                    .fetch_all(p)
                    .await?
                {
                    out.push(read_row!(r));
                }
                out
            });
            if rows.is_empty() {
                break;
            }
            for row in rows {
                if row.seq != seq + 1 {
                    return broken(
                        checked,
                        format!("records {} to {} are missing", seq + 1, row.seq - 1),
                    );
                }
                if row.prev_hash != prev {
                    return broken(
                        checked,
                        format!("record {} does not follow record {seq}", row.seq),
                    );
                }
                if link(&prev, &row.body) != row.hash {
                    return broken(
                        checked,
                        format!("record {} was changed (hash mismatch)", row.seq),
                    );
                }
                let Ok(record) = row.record() else {
                    return broken(checked, format!("record {} is not readable", row.seq));
                };
                if !row.columns_match(&record) {
                    return broken(
                        checked,
                        format!(
                            "record {} was changed (columns differ from its hashed body)",
                            row.seq
                        ),
                    );
                }
                seq = row.seq;
                prev = row.hash;
                checked += 1;
            }
        }
        if seq != head_seq || prev != head_hash {
            return broken(
                checked,
                format!(
                    "the chain ends at record {seq} but its head is record {head_seq}: records were removed"
                ),
            );
        }
        Ok(Verification {
            checked,
            broken: None,
        })
    }

    async fn prune(&self, before_ms: i64) -> Result<u64, Error> {
        self.prune_retention(before_ms, &[]).await
    }

    async fn prune_retention(
        &self,
        before_ms: i64,
        per_pool: &[(String, i64)],
    ) -> Result<u64, Error> {
        // A record's cutoff: its pool's, else the default.
        let mut binds = vec![Bind::I(before_ms)];
        let mut cutoff = String::from("$1");
        if !per_pool.is_empty() {
            cutoff = String::from("CASE pool");
            for (pool, ms) in per_pool {
                binds.push(Bind::S(pool.clone()));
                binds.push(Bind::I(*ms));
                cutoff.push_str(&format!(" WHEN ${} THEN ${}", binds.len() - 1, binds.len()));
            }
            cutoff.push_str(" ELSE $1 END");
        }
        // The last record to remove: the one before the first record still within its
        // retention, or the last record when none is.
        let last = format!(
            "SELECT seq, hash FROM audit_records WHERE seq = COALESCE(\
             (SELECT MIN(seq) FROM audit_records WHERE time_ms >= {cutoff}) - 1, \
             (SELECT MAX(seq) FROM audit_records))"
        );
        on!(self, p, pg => {
            let mut tx = p.begin().await?;
            if pg {
                sqlx::query("SELECT head_seq FROM audit_chain WHERE id = 1 FOR UPDATE")
                    .fetch_one(&mut *tx)
                    .await?;
            }
            let text = sql(pg, &last);
            let mut q = sqlx::query(&text);
            for b in &binds {
                q = match b {
                    Bind::I(v) => q.bind(*v),
                    Bind::S(v) => q.bind(v.as_str()),
                };
            }
            let Some(last) = q.fetch_optional(&mut *tx).await? else {
                return Ok(0);
            };
            let seq: i64 = last.try_get("seq")?;
            let hash: String = last.try_get("hash")?;
            let n = sqlx::query(&sql(pg, "DELETE FROM audit_records WHERE seq <= $1"))
                .bind(seq)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(&sql(pg, "UPDATE audit_chain SET anchor_seq = $1, anchor_hash = $2 WHERE id = 1"))
                .bind(seq)
                .bind(&hash)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(n)
        })
    }

    async fn usage(&self, tenant: &str, since_ms: i64, until_ms: i64) -> Result<Usage, Error> {
        const USAGE: &str = "SELECT \
            CAST(COALESCE(SUM(CASE WHEN kind = 'execution' THEN 1 ELSE 0 END), 0) AS BIGINT) AS executions, \
            CAST(COALESCE(SUM(CASE WHEN kind = 'execution' THEN duration_ms ELSE 0 END), 0) AS DOUBLE PRECISION) AS exec_ms, \
            CAST(COALESCE(SUM(CASE WHEN kind IN ('session_expired', 'session_deleted', 'session_killed', 'sandbox_hibernated') \
                 THEN duration_ms ELSE 0 END), 0) AS DOUBLE PRECISION) AS session_ms, \
            CAST(COALESCE(SUM(cpu_time_ms), 0) AS DOUBLE PRECISION) AS cpu_ms, \
            CAST(COALESCE(MAX(peak_memory_bytes), 0) AS BIGINT) AS peak, \
            CAST(COALESCE(SUM(CASE WHEN kind = 'session_created' THEN 1 ELSE 0 END), 0) AS BIGINT) AS created \
            FROM audit_records WHERE tenant = $1 AND time_ms >= $2 AND time_ms < $3";
        on!(self, p, pg => {
            let r = sqlx::query(&sql(pg, USAGE))
                .bind(tenant)
                .bind(since_ms)
                .bind(until_ms)
                .fetch_one(p)
                .await?;
            let ms = |c: &str| -> Result<f64, Error> { Ok(r.try_get::<f64, _>(c)? / 1000.0) };
            Ok(Usage {
                executions: r.try_get("executions")?,
                execution_seconds: ms("exec_ms")?,
                session_seconds: ms("session_ms")?,
                cpu_seconds: ms("cpu_ms")?,
                peak_memory_bytes: r.try_get("peak")?,
                sessions_created: r.try_get("created")?,
            })
        })
    }
}
