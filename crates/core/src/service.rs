//! The command API: whole-request operations that every door (the native `/v1` API, the
//! ACA-compatible API, MCP) calls, one call per request, as Firecracker's API server turns
//! every request into one `VmmAction` answered by the VMM.
//!
//! Each command takes the [`Caller`] and a typed description of what to do, and answers a
//! value or an [`Error`]. The order of the checks is fixed here, once, for every door:
//!
//! 1. the identifier (well formed), the pool (exists), the session (found, or to be made);
//! 2. the tenant's policy: may it use the pool, may it use the pool's language, does the
//!    requested language match the session's;
//! 3. the timeout (positive, within the tenant's maximum);
//! 4. the rate limit (executions per minute), which takes a slot only when 1–3 passed;
//! 5. admission: the pool's and the tenant's session limits, counted as the session's slot
//!    is reserved;
//! 6. then, and only then, creation: a sandbox is started (or taken from the warm stock).
//!
//! So a refused request never starts a sandbox, and a request refused for one reason takes
//! nothing of another budget. An execution's id (`exe_…`) is made here once it is admitted,
//! and is what the doors answer, the audit record holds and the log lines carry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use ampoule_runtime::scratch::FileInfo;
use ampoule_types::{ExecutionEvent, ExecutionResult, Language};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::caller::Caller;
use crate::engine::ExecRequest;
use crate::error::Error;
use crate::files::ByteStream;
use crate::manager::{FileCall, Manager, PoolStatus, Session, random_hex};
use crate::sandbox::Ctx;

/// Which session a command is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A session by its id (`ses_…`, the native API); never created.
    Id(String),
    /// The caller's session of this identifier in whichever pool holds it; never created
    /// (MCP's file tools and delete).
    Name(String),
    /// The session of `identifier` in `pool` (the default pool when `None`), started on
    /// first use (the ACA API).
    Named {
        /// The pool.
        pool: Option<String>,
        /// The caller's name for the session.
        identifier: String,
    },
    /// The session of `identifier` in whichever pool holds it, else a new one (under
    /// `identifier`, or a generated name) in a pool of `language` (MCP's execute and upload).
    Conversation {
        /// The caller's name for the session; `None`: a new one with a generated name.
        identifier: Option<String>,
        /// The language a new session runs (default: the default pool's).
        language: Option<String>,
    },
}

/// A session as the commands report it (a snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// The session's id (`ses_…`).
    pub id: String,
    /// Its pool.
    pub pool: String,
    /// The caller's name for it (the ACA `identifier`, the MCP `session`).
    pub identifier: String,
    /// The language of its interpreter.
    pub language: Language,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it was last used.
    pub last_used_at: SystemTime,
    /// When it expires if left idle.
    pub expires_at: SystemTime,
    /// Executions so far.
    pub executions: u64,
    /// Whether a call is running in it now.
    pub busy: bool,
}

/// `create_session`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSession {
    /// The pool (default: the default pool).
    pub pool: Option<String>,
    /// The caller's name for it (default: a generated one); an existing session of this
    /// name in the pool is returned instead of a new one.
    pub identifier: Option<String>,
}

/// `execute` and `execute_streaming`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecuteCommand {
    /// Where to run.
    pub target: Target,
    /// Source code.
    pub code: String,
    /// The language the caller expects; must be the session's.
    pub language: Option<String>,
    /// Wall-clock limit in seconds (default: the pool's; never above the pool's maximum).
    pub timeout_s: Option<f64>,
    /// A JSON object made available to the code as `inputs`.
    pub inputs: Option<serde_json::Map<String, serde_json::Value>>,
    /// The context to run in (a sandbox's; default: its interpreter, or in a sandbox the
    /// default context of `language`).
    pub context: Option<String>,
}

impl ExecuteCommand {
    /// `code` in `target`, everything else by default.
    pub fn new(target: Target, code: impl Into<String>) -> Self {
        Self {
            target,
            code: code.into(),
            language: None,
            timeout_s: None,
            inputs: None,
            context: None,
        }
    }
}

/// What `execute` answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    /// The execution's id (`exe_…`): its audit record's and its log lines'.
    pub execution_id: String,
    /// The session it ran in (as it was when the execution was admitted).
    pub session: SessionInfo,
    /// The result.
    pub result: ExecutionResult,
}

/// The outcome of a streaming execution, once its events are over.
pub type Outcome = Pin<Box<dyn Future<Output = Result<ExecutionResult, Error>> + Send>>;

/// What `execute_streaming` answers once the execution is admitted and started: its output
/// as it happens, then its result.
pub struct Streaming {
    /// The execution's id (`exe_…`).
    pub execution_id: String,
    /// The session it runs in.
    pub session: SessionInfo,
    /// Output events; the channel closes when the execution is over.
    pub events: UnboundedReceiver<ExecutionEvent>,
    /// The result (await it once `events` is closed).
    pub outcome: Outcome,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("execution_id", &self.execution_id)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// `put_file`.
pub struct PutFile {
    /// The session.
    pub target: Target,
    /// The file's path below `/mnt/data`.
    pub path: String,
    /// Its bytes.
    pub body: ByteStream,
    /// The most bytes accepted.
    pub max: u64,
}

impl std::fmt::Debug for PutFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutFile")
            .field("target", &self.target)
            .field("path", &self.path)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// What `get_file` answers: the file open for reading. The session counts as busy (the
/// reaper leaves it alone) until this is dropped.
pub struct Download {
    /// The session.
    pub session: SessionInfo,
    /// What the file was when opened (read no more than `info.size` bytes: sandboxed code
    /// may grow it meanwhile).
    pub info: FileInfo,
    /// The file.
    pub file: std::fs::File,
    _call: FileCall,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// A tenant's cost budgets (`None`: none) and what it spent in the last hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Spent in the last hour (tracked only when the tenant has a budget).
    pub spent: crate::quota::Spent,
    /// CPU seconds per hour.
    pub cpu_seconds_per_hour: Option<f64>,
    /// Memory GiB-seconds per hour.
    pub memory_gib_seconds_per_hour: Option<f64>,
}

/// `query_audit`: which records of the caller's tenant; times in milliseconds since the
/// Unix epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only this session id.
    pub session: Option<String>,
    /// Only this pool.
    pub pool: Option<String>,
    /// Only this identifier (the caller's session name).
    pub identifier: Option<String>,
    /// Only this execution id.
    pub execution: Option<String>,
    /// From this time on (inclusive).
    pub since: Option<i64>,
    /// Before this time.
    pub until: Option<i64>,
    /// Only this status.
    pub status: Option<String>,
    /// Only this language.
    pub language: Option<String>,
    /// Only this kind (`execution`, `session_created`, …).
    pub kind: Option<String>,
    /// The previous page's `next`.
    pub after: Option<i64>,
    /// Records per page.
    pub limit: Option<u32>,
    /// Only records of this run (the caller context's `run_id`).
    pub run_id: Option<String>,
}

/// Checks an identifier: 1-256 characters, no control characters (ACA documents 4-128 from
/// a wide set; clients generate UUIDs, and some send `&`, `#` or `%` unencoded).
pub fn check_identifier(id: &str) -> Result<(), Error> {
    let n = id.chars().count();
    if n == 0 || n > 256 || id.chars().any(char::is_control) {
        return Err(Error::invalid(
            "the identifier must be 1-256 characters without control characters",
        ));
    }
    Ok(())
}

/// A target resolved without starting anything: an existing session, or the pool and name
/// of one to create once every check has passed.
enum Resolved {
    Existing(Arc<Session>),
    New { pool: String, identifier: String },
}

impl Resolved {
    fn pool(&self) -> &str {
        match self {
            Resolved::Existing(s) => &s.pool,
            Resolved::New { pool, .. } => pool,
        }
    }

    fn identifier(&self) -> &str {
        match self {
            Resolved::Existing(s) => &s.identifier,
            Resolved::New { identifier, .. } => identifier,
        }
    }

    fn session_id(&self) -> &str {
        match self {
            Resolved::Existing(s) => &s.id,
            Resolved::New { .. } => "",
        }
    }
}

fn parse_language(lang: &str) -> Result<Language, Error> {
    Language::parse(lang).ok_or_else(|| Error::invalid(format!("unknown language {lang:?}")))
}

impl Manager {
    fn info(&self, s: &Session) -> SessionInfo {
        let pool = self.pool(&s.pool).ok();
        let idle = pool.map(|p| p.idle_timeout).unwrap_or_default();
        let last = s.last_used_at();
        SessionInfo {
            id: s.id.clone(),
            pool: s.pool.clone(),
            identifier: s.identifier.clone(),
            language: pool.map_or(Language::Python, |p| p.spec.language),
            created_at: s.created_at,
            last_used_at: last,
            expires_at: last + idle,
            executions: s.executions(),
            busy: s.busy(),
        }
    }

    /// The pool a new session in `language` goes to: the default pool when it runs it, else
    /// the pool named after it, else the first that runs it.
    fn pool_for(&self, language: Option<&str>) -> Result<String, Error> {
        let default = self.default_pool().to_owned();
        let Some(lang) = language else {
            return Ok(default);
        };
        let wanted = parse_language(lang)?;
        let pools = self.pools();
        let runs = |p: &&PoolStatus| p.language == wanted.as_str();
        pools
            .iter()
            .filter(runs)
            .find(|p| p.name == default)
            .or_else(|| {
                pools
                    .iter()
                    .filter(runs)
                    .find(|p| p.name == wanted.as_str())
            })
            .or_else(|| pools.iter().find(runs))
            .map(|p| p.name.clone())
            .ok_or(Error::NoPoolFor(wanted))
    }

    /// Step 1: which session, without starting one.
    fn resolve(&self, caller: &Caller, target: &Target) -> Result<Resolved, Error> {
        let tenant = caller.tenant.as_str();
        let resolved = match target {
            Target::Id(id) => match self.get(tenant, id) {
                Ok(s) => Resolved::Existing(s),
                // A hibernated one comes back under its key when it is materialized.
                Err(e) => self.dormant_target(tenant, |r| r.id == *id).ok_or(e)?,
            },
            Target::Name(name) => match self.find_any(tenant, name) {
                Some(s) => Resolved::Existing(s),
                None => self
                    .dormant_target(tenant, |r| r.identifier == *name)
                    .ok_or_else(|| {
                        Error::SessionNotFound(format!(
                            "no session {name:?} (it may have expired; list_sessions shows \
                             the live ones)"
                        ))
                    })?,
            },
            Target::Named { pool, identifier } => {
                check_identifier(identifier)?;
                let pool = pool.as_deref().unwrap_or(self.default_pool());
                self.pool(pool)?;
                match self.find(tenant, pool, identifier) {
                    Some(s) => Resolved::Existing(s),
                    None => Resolved::New {
                        pool: pool.to_owned(),
                        identifier: identifier.clone(),
                    },
                }
            }
            Target::Conversation {
                identifier,
                language,
            } => {
                let found = identifier
                    .as_deref()
                    .and_then(|name| self.find_any(tenant, name));
                let dormant = identifier
                    .as_deref()
                    .and_then(|name| self.dormant_target(tenant, |r| r.identifier == name));
                match found {
                    Some(s) => Resolved::Existing(s),
                    None if dormant.is_some() => dormant.ok_or_else(Error::session_not_found)?,
                    None => {
                        if let Some(name) = identifier {
                            check_identifier(name)?;
                        }
                        Resolved::New {
                            pool: self.pool_for(language.as_deref())?,
                            identifier: identifier.clone().unwrap_or_else(|| self.new_name()),
                        }
                    }
                }
            }
        };
        if let Resolved::Existing(s) = &resolved {
            tracing::Span::current().record("session", s.id.as_str());
        }
        Ok(resolved)
    }

    /// Step 2: the tenant's policy for the pool and its language, and the language the
    /// caller expects (`language`).
    async fn check_policy(
        &self,
        caller: &Caller,
        r: &Resolved,
        language: Option<&str>,
    ) -> Result<(), Error> {
        let pool = self.pool(r.pool())?;
        let has = pool.spec.language;
        if let Some(lang) = language {
            let wanted = parse_language(lang)?;
            if wanted != has {
                let message = match r {
                    Resolved::Existing(s) => format!(
                        "session {:?} runs {has}, not {wanted}: use another session for {wanted}",
                        s.identifier
                    ),
                    Resolved::New { pool, .. } => format!("pool {pool:?} runs {has}, not {wanted}"),
                };
                return Err(Error::LanguageMismatch(message));
            }
        }
        match self.quotas().check_pool(&caller.tenant, r.pool(), has) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.refused(caller, r, e).await),
        }
    }

    async fn refused(&self, caller: &Caller, r: &Resolved, e: Error) -> Error {
        self.refuse(caller, r.pool(), r.session_id(), Some(r.identifier()), e)
            .await
    }

    /// Steps 5 and 6: the session, created now if it is new.
    async fn materialize(&self, caller: &Caller, r: Resolved) -> Result<Arc<Session>, Error> {
        match r {
            Resolved::Existing(s) => {
                // Named by a call: a paused session runs again.
                self.wake(&s, Some(caller)).await?;
                s.touch();
                Ok(s)
            }
            Resolved::New { pool, identifier } => {
                Ok(self.get_or_create(caller, &pool, &identifier).await?.0)
            }
        }
    }

    /// Steps 1 to 5 of an execution: the session it runs in (created if new) and the
    /// request, or the refusal.
    async fn admit_execution(
        &self,
        caller: &Caller,
        cmd: ExecuteCommand,
        execution_id: &str,
    ) -> Result<(Arc<Session>, ExecRequest, Option<Arc<Ctx>>), Error> {
        let r = self.resolve(caller, &cmd.target)?;
        // In a sandbox (or naming a context) the language picks a context instead of
        // having to be the session's.
        let routed =
            cmd.context.is_some() || matches!(&r, Resolved::Existing(s) if s.sandbox.is_sandbox);
        let expect = if routed {
            None
        } else {
            cmd.language.as_deref()
        };
        self.check_policy(caller, &r, expect).await?;
        let timeout_s = match self.timeout_for(&caller.tenant, r.pool(), cmd.timeout_s) {
            Ok(t) => t,
            Err(e) if e.is_policy() => return Err(self.refused(caller, &r, e).await),
            Err(e) => return Err(e),
        };
        if let Err(e) = self.admit_execution_rate(&caller.tenant).await {
            return Err(self.refused(caller, &r, e).await);
        }
        // An approval checkpoint holds it here: admitted, nothing started yet.
        self.await_approval(
            caller,
            crate::approval::Ask {
                pool: r.pool(),
                identifier: r.identifier(),
                session: r.session_id(),
                code: &cmd.code,
                execution_id,
            },
        )
        .await?;
        let session = self.materialize(caller, r).await?;
        let ctx = if routed {
            self.route_execution(
                caller,
                &session,
                cmd.context.as_deref(),
                cmd.language.as_deref(),
            )
            .await?
        } else {
            None
        };
        Ok((
            session,
            ExecRequest {
                code: cmd.code,
                timeout_s,
                inputs: cmd.inputs,
            },
            ctx,
        ))
    }

    /// Runs code and answers its result. The one call every door's execute path makes.
    pub async fn execute(&self, caller: &Caller, cmd: ExecuteCommand) -> Result<Executed, Error> {
        let execution_id = format!("exe_{}", random_hex(12));
        let (session, req, ctx) = self.admit_execution(caller, cmd, &execution_id).await?;
        let info = self.info(&session);
        let result = self
            .spawn_execution(caller, &session, ctx, req, None, execution_id.clone())
            .await
            .map_err(Error::internal)??;
        Ok(Executed {
            execution_id,
            session: info,
            result,
        })
    }

    /// Runs code and answers at once, once the execution is admitted (a refusal is an
    /// error here, before any output): its id, its output as it happens, then its result.
    pub async fn execute_streaming(
        &self,
        caller: &Caller,
        cmd: ExecuteCommand,
    ) -> Result<Streaming, Error> {
        let execution_id = format!("exe_{}", random_hex(12));
        let (session, req, ctx) = self.admit_execution(caller, cmd, &execution_id).await?;
        let info = self.info(&session);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let run = self.spawn_execution(caller, &session, ctx, req, Some(tx), execution_id.clone());
        Ok(Streaming {
            execution_id,
            session: info,
            events,
            outcome: Box::pin(async move { run.await.map_err(Error::internal)? }),
        })
    }

    /// Creates a session, or answers the existing one of the same identifier in the pool.
    /// Returns it and whether it was created.
    pub async fn create_session(
        &self,
        caller: &Caller,
        cmd: CreateSession,
    ) -> Result<(SessionInfo, bool), Error> {
        let identifier = match cmd.identifier {
            Some(id) => id,
            None => self.new_name(),
        };
        let target = Target::Named {
            pool: cmd.pool,
            identifier,
        };
        let r = self.resolve(caller, &target)?;
        self.check_policy(caller, &r, None).await?;
        let (session, created) = match r {
            Resolved::Existing(s) => (s, false),
            Resolved::New { pool, identifier } => {
                self.get_or_create(caller, &pool, &identifier).await?
            }
        };
        Ok((self.info(&session), created))
    }

    /// One session of the caller; never created.
    pub fn get_session(&self, caller: &Caller, target: &Target) -> Result<SessionInfo, Error> {
        match self.resolve(caller, target)? {
            Resolved::Existing(s) => Ok(self.info(&s)),
            // A hibernated session is still there (reading it does not resume it).
            Resolved::New { pool, identifier } => self
                .dormant_for_key(&(caller.tenant.clone(), pool, identifier))
                .map(|r| self.dormant_session_info(&r))
                .ok_or_else(Error::session_not_found),
        }
    }

    /// A hibernated session as the session commands report it.
    fn dormant_session_info(&self, r: &crate::lifecycle::Record) -> SessionInfo {
        let pool = self.pool(&r.pool).ok();
        let created = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_millis(r.created_at_ms.max(0) as u64);
        let last = r.hibernated_at_ms.map_or(created, |ms| {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
        });
        SessionInfo {
            id: r.id.clone(),
            pool: r.pool.clone(),
            identifier: r.identifier.clone(),
            language: pool.map_or(Language::Python, |p| p.spec.language),
            created_at: created,
            last_used_at: last,
            expires_at: last + pool.map(|p| p.idle_timeout).unwrap_or_default(),
            executions: 0,
            busy: false,
        }
    }

    /// The caller's sessions (in `pool` only, when given: `pool_not_found` when there is no
    /// such pool), oldest first.
    pub fn list_sessions(
        &self,
        caller: &Caller,
        pool: Option<&str>,
    ) -> Result<Vec<SessionInfo>, Error> {
        if let Some(p) = pool {
            self.pool(p)?;
        }
        let dormant: Vec<crate::lifecycle::Record> = self.inner.dormant.lock().map_or_else(
            |_| Vec::new(),
            |d| {
                d.values()
                    .map(|x| x.record.clone())
                    .filter(|r| r.tenant == caller.tenant)
                    .collect()
            },
        );
        Ok(self
            .list(&caller.tenant)
            .iter()
            .filter(|s| pool.is_none_or(|p| s.pool == p))
            .map(|s| self.info(s))
            .chain(
                dormant
                    .iter()
                    .filter(|r| pool.is_none_or(|p| r.pool == p))
                    .map(|r| self.dormant_session_info(r)),
            )
            .collect())
    }

    /// Destroys a session and everything in it; never creates one.
    pub async fn delete_session(&self, caller: &Caller, target: &Target) -> Result<(), Error> {
        match self.resolve(caller, target)? {
            Resolved::Existing(s) => {
                self.delete(caller, &s).await;
                Ok(())
            }
            // A hibernated one: its record and files go.
            Resolved::New { pool, identifier } => {
                let key = (caller.tenant.clone(), pool, identifier);
                match self.dormant_for_key(&key) {
                    Some(r)
                        if self
                            .delete_dormant(&caller.tenant, &r.id, None, Some(caller))
                            .await =>
                    {
                        Ok(())
                    }
                    _ => Err(Error::session_not_found()),
                }
            }
        }
    }

    /// The pools the caller may use, with their figures.
    pub fn list_pools(&self, caller: &Caller) -> Vec<PoolStatus> {
        let quotas = self.quotas();
        self.pools()
            .into_iter()
            .filter(|p| {
                Language::parse(&p.language)
                    .is_some_and(|l| quotas.check_pool(&caller.tenant, &p.name, l).is_ok())
            })
            .collect()
    }

    /// The language of a pool (the default pool when `None`), or `pool_not_found`.
    pub fn pool_language(&self, pool: Option<&str>) -> Result<Language, Error> {
        let name = pool.unwrap_or(self.default_pool());
        Ok(self.pool(name)?.spec.language)
    }

    /// The session a file command works in, created when the target says so (policy
    /// checked first), marked busy for the call.
    async fn file_session(&self, caller: &Caller, target: &Target) -> Result<FileCall, Error> {
        let r = self.resolve(caller, target)?;
        if let Resolved::New { .. } = r {
            self.check_policy(caller, &r, None).await?;
        }
        let s = self.materialize(caller, r).await?;
        Ok(self.file_call(&s))
    }

    /// Writes a file (parents created, an existing file replaced).
    pub async fn put_file(
        &self,
        caller: &Caller,
        cmd: PutFile,
    ) -> Result<(SessionInfo, FileInfo), Error> {
        let call = self.file_session(caller, &cmd.target).await?;
        let s = call.session();
        let info = crate::files::put(&s.live, &cmd.path, cmd.body, cmd.max).await?;
        Ok((self.info(s), info))
    }

    /// Opens a regular file for reading.
    pub async fn get_file(
        &self,
        caller: &Caller,
        target: &Target,
        path: &str,
    ) -> Result<Download, Error> {
        let call = self.file_session(caller, target).await?;
        let (file, info) = crate::files::open(&call.session().live, path).await?;
        Ok(Download {
            session: self.info(call.session()),
            info,
            file,
            _call: call,
        })
    }

    /// What is at `path` (a file or a directory; links are not followed).
    pub async fn stat_file(
        &self,
        caller: &Caller,
        target: &Target,
        path: &str,
    ) -> Result<FileInfo, Error> {
        let call = self.file_session(caller, target).await?;
        crate::files::stat(&call.session().live, path).await
    }

    /// Every regular file in the session's `/mnt/data`, recursively.
    pub async fn list_files(
        &self,
        caller: &Caller,
        target: &Target,
    ) -> Result<(SessionInfo, Vec<FileInfo>), Error> {
        let call = self.file_session(caller, target).await?;
        let files = crate::files::list(&call.session().live).await?;
        Ok((self.info(call.session()), files))
    }

    /// Removes a file (a link itself, never its target).
    pub async fn delete_file(
        &self,
        caller: &Caller,
        target: &Target,
        path: &str,
    ) -> Result<(), Error> {
        let call = self.file_session(caller, target).await?;
        crate::files::remove(&call.session().live, path).await
    }

    /// Makes a directory and its missing parents; answers whether it was made (`false`: it
    /// was there).
    pub async fn make_dir(
        &self,
        caller: &Caller,
        target: &Target,
        path: &str,
    ) -> Result<bool, Error> {
        let call = self.file_session(caller, target).await?;
        crate::files::make_dir(&call.session().live, path).await
    }

    /// Moves a regular file (an existing file at `to` is replaced).
    pub async fn move_file(
        &self,
        caller: &Caller,
        target: &Target,
        from: &str,
        to: &str,
    ) -> Result<FileInfo, Error> {
        let call = self.file_session(caller, target).await?;
        crate::files::move_file(&call.session().live, from, to).await
    }

    /// Removes a file, or every file below a directory.
    pub async fn delete_tree(
        &self,
        caller: &Caller,
        target: &Target,
        path: &str,
    ) -> Result<(), Error> {
        let call = self.file_session(caller, target).await?;
        crate::files::remove_tree(&call.session().live, path).await
    }

    /// The tokens of one of the caller's sandboxes (E2B's connect answers them again).
    pub fn sandbox_tokens(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<crate::sandbox::SandboxTokens, Error> {
        match self.get(&caller.tenant, id) {
            Ok(s) => Ok(s.sandbox.tokens.clone()),
            Err(e) => {
                let r = self
                    .dormant_record(id)
                    .filter(|r| r.tenant == caller.tenant);
                let r = r.ok_or(e)?;
                Ok(crate::sandbox::SandboxTokens {
                    access: r.access_token,
                    traffic: r.traffic_token,
                })
            }
        }
    }

    /// A hibernated session of the tenant's that `which` picks, as a target that brings it
    /// back (under its own key) when it is materialized.
    fn dormant_target(
        &self,
        tenant: &str,
        which: impl Fn(&crate::lifecycle::Record) -> bool,
    ) -> Option<Resolved> {
        let d = self.inner.dormant.lock().ok()?;
        d.values()
            .map(|x| &x.record)
            .find(|r| r.tenant == tenant && which(r))
            .map(|r| Resolved::New {
                pool: r.pool.clone(),
                identifier: r.identifier.clone(),
            })
    }

    /// The audit store, once every record queued before this call is in it: the writer
    /// holds a batch back for a few milliseconds (see `ampoule_audit::Writer`), and a caller
    /// that reads the log right after its own calls must find them there.
    async fn audit_store(&self) -> Result<Arc<dyn ampoule_audit::AuditStore>, Error> {
        let audit = self.audit().ok_or(Error::NoAuditLog)?;
        if let Err(e) = audit.writer.flush().await {
            tracing::error!(error = %e, "audit writer not flushed before a read");
        }
        Ok(audit.store.clone())
    }

    /// The caller's audit records (never another tenant's).
    pub async fn query_audit(
        &self,
        caller: &Caller,
        q: AuditQuery,
    ) -> Result<ampoule_audit::Page, Error> {
        let store = self.audit_store().await?;
        let kind = match q.kind.as_deref() {
            None => None,
            Some(k) => Some(
                serde_json::from_value::<ampoule_audit::Kind>(serde_json::Value::String(
                    k.to_owned(),
                ))
                .map_err(|_| Error::invalid(format!("unknown kind {k:?}")))?,
            ),
        };
        let filter = ampoule_audit::Filter {
            tenant: caller.tenant.clone(),
            session: q.session,
            pool: q.pool,
            identifier: q.identifier,
            execution: q.execution,
            since_ms: q.since,
            until_ms: q.until,
            status: q.status,
            language: q.language,
            kind,
            after: q.after,
            limit: q.limit,
            run_id: q.run_id,
        };
        store.query(&filter).await.map_err(Error::internal)
    }

    /// The caller's tenant's cost budgets and what it spent of them in the last hour.
    pub fn budget(&self, caller: &Caller) -> Budget {
        let p = self.quotas().policy(&caller.tenant);
        Budget {
            spent: self.quotas().spent(&caller.tenant),
            cpu_seconds_per_hour: p.cpu_seconds_per_hour,
            memory_gib_seconds_per_hour: p.memory_gib_seconds_per_hour,
        }
    }

    /// The caller's metered usage over a period (milliseconds since the Unix epoch).
    pub async fn usage(
        &self,
        caller: &Caller,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<ampoule_audit::Usage, Error> {
        let store = self.audit_store().await?;
        store
            .usage(&caller.tenant, since_ms, until_ms)
            .await
            .map_err(Error::internal)
    }
}
