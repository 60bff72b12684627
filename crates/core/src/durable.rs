//! The manager's side of durable sandboxes (see [`crate::lifecycle`] for the policy, the
//! states and the store): pause and resume, hibernation and the way back, what the reaper
//! does to each sandbox, and reading the store back when the server starts.
//!
//! Invariants:
//! - a hibernated sandbox is in [`Inner::dormant`](crate::manager::Inner) and nowhere else:
//!   nothing of it runs, its record on disk says `hibernated_at_ms`;
//! - it is brought back once: [`Manager::restore`] runs under the `waking` lock and looks
//!   again before starting it;
//! - every transition is audited (`sandbox_paused`, `sandbox_hibernated`, `sandbox_resumed`
//!   with `memory_kept`/`memory_lost`, `session_expired`/`session_deleted` with the policy's
//!   reason) and counted by the observer.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ampoule_audit::{Kind, Record as AuditRecord};

use crate::caller::Caller;
use crate::error::Error;
use crate::lifecycle::{Lifecycle, OnIdle, OnTimeout, RECORD_VERSION, Record, Store};
use crate::manager::{Key, Manager, Session, Slot, now_ms, random_hex};
use crate::sandbox::{Extras, SandboxInfo};
use crate::settings::PoolSettings;

/// A hibernated sandbox.
#[derive(Debug, Clone)]
pub(crate) struct Dormant {
    pub(crate) record: Record,
    /// Since when it is not running (paused time before its hibernation included).
    pub(crate) since: Instant,
}

/// What the reaper does to a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Destroy it (and its disk), for this reason.
    Delete(&'static str),
    /// Freeze it.
    Pause,
    /// Write it down and stop it, for this reason.
    Hibernate(&'static str),
}

/// How many sandboxes are in each state, and what their disks take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxCounts {
    /// Running sandboxes and sessions.
    pub running: usize,
    /// Paused ones.
    pub paused: usize,
    /// Hibernated ones.
    pub hibernated: usize,
    /// Bytes the durable ones' disks take on the host.
    pub disk_bytes: u64,
}

/// How long a checkpoint at shutdown may take before the sandbox is recorded with its files
/// only.
const SHUTDOWN_CHECKPOINT: Duration = Duration::from_secs(20);

/// CPU time between two looks of the reaper (every 500 ms) above which a sandbox is busy: 4 %
/// of a core. An idle interpreter uses next to none.
const BUSY_CPU_NS: u64 = 20_000_000;

fn ms_of(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn since_ms(ms: i64) -> Duration {
    Duration::from_millis((now_ms() - ms).max(0) as u64)
}

impl Manager {
    /// Where durable sandboxes live, read back: every sandbox recorded there is hibernated
    /// from now on (those that were running when the server stopped or crashed too), and
    /// listed. Returns how many. Only the first call counts.
    pub fn set_store(&self, store: Store) -> usize {
        let records = store.load_all();
        if self.inner.store.set(store).is_err() {
            return 0;
        }
        let mut n = 0;
        for mut r in records {
            let stopped = r.hibernated_at_ms.unwrap_or_else(now_ms);
            if r.hibernated_at_ms.is_none() {
                // It was running when the server went: its memory is gone, its files are not.
                r.hibernated_at_ms = Some(stopped);
                if let Some(s) = self.store() {
                    let _ = s
                        .save(&r)
                        .map_err(|e| tracing::warn!(error = %e, "recording a sandbox"));
                }
            }
            let since = Instant::now()
                .checked_sub(since_ms(stopped))
                .unwrap_or_else(Instant::now);
            tracing::info!(sandbox = %r.id, tenant = %r.tenant, pool = %r.pool, "hibernated sandbox read back");
            if let Ok(mut d) = self.inner.dormant.lock() {
                d.insert(r.id.clone(), Dormant { record: r, since });
                n += 1;
            }
        }
        n
    }

    /// The store, when one was set.
    pub(crate) fn store(&self) -> Option<&Store> {
        self.inner.store.get()
    }

    /// Makes room for a new durable sandbox's disk: refused when the tenant's durable disks
    /// (each counted at its pool's disk limit) would pass its quota.
    pub(crate) async fn durable_disk(
        &self,
        caller: &Caller,
        pool: &str,
        id: &str,
    ) -> Result<std::path::PathBuf, Error> {
        let Some(store) = self.store() else {
            return Err(Error::NotSupported(
                "this server keeps no durable sandboxes (it has no data_dir)".into(),
            ));
        };
        let size = |p: &str| self.pool(p).map_or(0, |p| p.spec.limits.disk_mib);
        let tenant = caller.tenant.as_str();
        let live: u64 = self
            .list(tenant)
            .iter()
            .filter(|s| s.sandbox.disk.is_some())
            .map(|s| size(&s.pool))
            .sum();
        let dormant: u64 = self
            .inner
            .dormant
            .lock()
            .map(|d| {
                d.values()
                    .filter(|x| x.record.tenant == tenant)
                    .map(|x| size(&x.record.pool))
                    .sum()
            })
            .unwrap_or(0);
        let max_mib = self
            .quotas()
            .policy(tenant)
            .durable_disk_mib
            .unwrap_or(crate::quota::DEFAULT_DURABLE_DISK_MIB);
        if live + dormant + size(pool) > max_mib {
            let e = Error::DiskQuota { max_mib };
            return Err(self.refuse(caller, pool, id, None, e).await);
        }
        let disk = store.disk(id);
        if let Some(dir) = disk.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
        }
        Ok(disk)
    }

    /// Deletes a durable sandbox's record and disk.
    pub(crate) fn forget_disk(&self, id: &str) {
        if let Some(s) = self.store() {
            s.remove(id);
        }
    }

    /// The extras of a new session in a pool whose policy makes its sessions durable (with
    /// the id it must have), else `None`.
    pub(crate) async fn durable_session_extras(
        &self,
        caller: &Caller,
        pool: &str,
    ) -> Result<Option<(Extras, String)>, Error> {
        let lifecycle = self.pool(pool)?.lifecycle.clone();
        if !lifecycle.is_durable() || self.store().is_none() {
            return Ok(None);
        }
        let id = format!("ses_{}", random_hex(12));
        let mut x = Extras::session();
        x.disk = Some(self.durable_disk(caller, pool, &id).await?);
        x.lifecycle = lifecycle;
        Ok(Some((x, id)))
    }

    fn record_of(&self, s: &Session, hibernated_at_ms: Option<i64>) -> Record {
        Record {
            version: RECORD_VERSION,
            id: s.id.clone(),
            tenant: s.tenant.clone(),
            pool: s.pool.clone(),
            identifier: s.identifier.clone(),
            is_sandbox: s.sandbox.is_sandbox,
            created_at_ms: ms_of(s.created_at),
            metadata: s.sandbox.metadata.clone(),
            envs: s.sandbox.envs.clone(),
            access_token: s.sandbox.tokens.access.clone(),
            traffic_token: s.sandbox.tokens.traffic.clone(),
            life_left_ms: s.sandbox.life_left_ms(),
            lifecycle: s.sandbox.lifecycle.clone(),
            hibernated_at_ms,
            memory_kept: false,
        }
    }

    /// Whether a hibernated sandbox's memory is kept: its record says so and its checkpoint
    /// image is there.
    pub(crate) fn checkpointed(&self, r: &Record) -> bool {
        r.memory_kept
            && self
                .store()
                .is_some_and(|s| s.checkpoint(&r.id).join("checkpoint.img").is_file())
    }

    /// Writes a durable session's record as it runs (a crash then leaves it hibernated).
    pub(crate) fn save_record(&self, s: &Session) {
        if s.sandbox.disk.is_none() {
            return;
        }
        let Some(store) = self.store() else {
            return;
        };
        if let Err(e) = store.save(&self.record_of(s, None)) {
            tracing::warn!(sandbox = %s.id, error = %e, "recording a sandbox");
        }
    }

    /// The hibernated sandbox under this key, if one is.
    pub(crate) fn dormant_for_key(&self, key: &Key) -> Option<Record> {
        let d = self.inner.dormant.lock().ok()?;
        d.values()
            .find(|x| {
                x.record.tenant == key.0 && x.record.pool == key.1 && x.record.identifier == key.2
            })
            .map(|x| x.record.clone())
    }

    /// A hibernated sandbox's record, whoever it belongs to.
    pub(crate) fn dormant_record(&self, id: &str) -> Option<Record> {
        let d = self.inner.dormant.lock().ok()?;
        d.get(id).map(|x| x.record.clone())
    }

    /// One of the tenant's hibernated sandboxes, as the commands report it.
    pub(crate) fn dormant_info(&self, tenant: &str, id: &str) -> Option<SandboxInfo> {
        self.dormant_record(id)
            .filter(|r| r.tenant == tenant)
            .map(|r| self.record_info(&r))
    }

    /// The tenant's hibernated sandboxes.
    pub(crate) fn dormant_infos(&self, tenant: &str) -> Vec<SandboxInfo> {
        let records: Vec<Record> = self.inner.dormant.lock().map_or_else(
            |_| Vec::new(),
            |d| {
                d.values()
                    .filter(|x| x.record.tenant == tenant)
                    .map(|x| x.record.clone())
                    .collect()
            },
        );
        records.iter().map(|r| self.record_info(r)).collect()
    }

    /// A session-less audit record of a hibernated sandbox.
    async fn audit_dormant(
        &self,
        r: &Record,
        kind: Kind,
        decided_by: Option<&str>,
        by: Option<&Caller>,
    ) {
        let event = match kind {
            Kind::SessionExpired => "expired",
            _ => "deleted",
        };
        self.inner.observer.session_event(&r.pool, event);
        if self.audit().is_none() {
            return;
        }
        let mut a = AuditRecord::new(kind, now_ms(), &r.tenant, &r.pool, &r.id);
        a.language = self
            .pool(&r.pool)
            .ok()
            .map(|p| p.spec.language.as_str().to_owned());
        // Its running time was metered when it was hibernated.
        a.duration_ms = Some(0.0);
        a.decided_by = decided_by.map(str::to_owned);
        a.identifier = Some(r.identifier.clone());
        if let Some(c) = by {
            c.stamp(&mut a);
        }
        self.write_audit_record(a).await;
    }

    /// Deletes one of the tenant's hibernated sandboxes (`why`: the policy that did, else the
    /// caller). Whether there was one.
    pub(crate) async fn delete_dormant(
        &self,
        tenant: &str,
        id: &str,
        why: Option<&str>,
        by: Option<&Caller>,
    ) -> bool {
        let _waking = self.inner.waking.lock().await;
        let gone = self.inner.dormant.lock().ok().and_then(|mut d| {
            if d.get(id).is_some_and(|x| x.record.tenant == tenant) {
                d.remove(id)
            } else {
                None
            }
        });
        let Some(gone) = gone else {
            return false;
        };
        self.forget_disk(id);
        let kind = if why.is_some() {
            Kind::SessionExpired
        } else {
            Kind::SessionDeleted
        };
        tracing::info!(sandbox = %id, reason = why.unwrap_or("deleted"), "hibernated sandbox deleted");
        self.audit_dormant(&gone.record, kind, why, by).await;
        true
    }

    /// The caller's sandbox, running: a paused one is thawed, a hibernated one started again.
    /// What every command that uses a sandbox goes through.
    pub(crate) async fn awake(&self, caller: &Caller, id: &str) -> Result<Arc<Session>, Error> {
        match self.get(&caller.tenant, id) {
            Ok(s) => {
                self.wake(&s, Some(caller)).await?;
                Ok(s)
            }
            Err(e) => match self.dormant_record(id) {
                Some(r) if r.tenant == caller.tenant => self.restore(caller, &r).await,
                _ => Err(e),
            },
        }
    }

    /// Thaws a paused session (nothing when it runs): its timeout resumes where it stopped.
    pub(crate) async fn wake(&self, s: &Session, by: Option<&Caller>) -> Result<(), Error> {
        if s.sandbox.paused_since().is_none() {
            return Ok(());
        }
        let begun = Instant::now();
        // Under the execution lock: a pause and a resume of one sandbox never cross.
        let _x = s.exec_lock.lock().await;
        let Some(since) = s.sandbox.paused_since() else {
            return Ok(());
        };
        s.live.resume().map_err(Error::from)?;
        let paused = since.elapsed();
        if let Ok(mut l) = s.sandbox.life.lock() {
            l.paused = None;
            l.paused_total += paused;
        }
        s.sandbox.extend_end(paused);
        s.touch();
        let seconds = begun.elapsed().as_secs_f64();
        self.inner
            .observer
            .sandbox_transition(&s.pool, "resume", seconds);
        tracing::info!(sandbox = %s.id, ms = seconds * 1000.0, "sandbox resumed");
        self.audit_session(s, Kind::SandboxResumed, Some("memory_kept"), by)
            .await;
        Ok(())
    }

    /// Starts a hibernated sandbox again on its disk: same id, identifier, tokens, metadata
    /// and variables; restored from its checkpoint when it was hibernated with its memory
    /// (its variables then too), else with fresh contexts. The checkpoint image is deleted
    /// either way: the sandbox's memory lives on in it, or in the restored sandbox.
    pub(crate) async fn restore(&self, caller: &Caller, r: &Record) -> Result<Arc<Session>, Error> {
        let _waking = self.inner.waking.lock().await;
        // Another call may have brought it back meanwhile.
        if let Ok(s) = self.get(&caller.tenant, &r.id) {
            return Ok(s);
        }
        let Some(r) = self
            .dormant_record(&r.id)
            .filter(|x| x.tenant == caller.tenant)
        else {
            return Err(Error::session_not_found());
        };
        if self.is_draining() {
            // Stopping: brought back by the next server (or replica) instead.
            return Err(Error::ShuttingDown);
        }
        let Some(store) = self.store() else {
            return Err(Error::internal("a hibernated sandbox without a store"));
        };
        let begun = Instant::now();
        let mut extras = Extras::restored(&r, store.disk(&r.id));
        if self.checkpointed(&r) {
            extras.restore_image = Some(store.checkpoint(&r.id));
        }
        let s = self
            .create_with(caller, &r.pool, &r.identifier, Some(r.id.clone()), extras)
            .await?;
        store.remove_checkpoint(&r.id);
        if let Ok(mut d) = self.inner.dormant.lock() {
            d.remove(&r.id);
        }
        if !r.envs.is_empty() {
            self.set_default_env(&s, &r.envs).await;
        }
        self.save_record(&s);
        let seconds = begun.elapsed().as_secs_f64();
        self.inner
            .observer
            .sandbox_transition(&r.pool, "restore", seconds);
        let memory = if s.sandbox.memory_lost() {
            "memory_lost"
        } else {
            "memory_kept"
        };
        tracing::info!(sandbox = %r.id, ms = seconds * 1000.0, memory, "hibernated sandbox started again");
        self.audit_session(&s, Kind::SandboxResumed, Some(memory), Some(caller))
            .await;
        Ok(s)
    }

    /// Freezes a sandbox (memory kept, no CPU; its timeout stops). A paused or hibernated one
    /// is answered as it is. Refused while an execution runs in it.
    pub async fn pause_sandbox(&self, caller: &Caller, id: &str) -> Result<SandboxInfo, Error> {
        let s = match self.get(&caller.tenant, id) {
            Ok(s) => s,
            Err(e) => return self.dormant_info(&caller.tenant, id).ok_or(e),
        };
        self.pause_now(&s, "api", Some(caller)).await?;
        Ok(self.sandbox_info(&s))
    }

    async fn pause_now(&self, s: &Session, why: &str, by: Option<&Caller>) -> Result<(), Error> {
        let Ok(_x) = s.exec_lock.try_lock() else {
            return Err(Error::Conflict(
                "an execution is running in this sandbox; pause it once it ends".into(),
            ));
        };
        if s.sandbox.paused_since().is_some() {
            return Ok(());
        }
        let begun = Instant::now();
        s.live.pause().map_err(Error::from)?;
        if let Ok(mut l) = s.sandbox.life.lock() {
            l.paused = Some(Instant::now());
        }
        let seconds = begun.elapsed().as_secs_f64();
        self.inner
            .observer
            .sandbox_transition(&s.pool, "pause", seconds);
        tracing::info!(sandbox = %s.id, ms = seconds * 1000.0, reason = why, "sandbox paused");
        self.audit_session(s, Kind::SandboxPaused, Some(why), by)
            .await;
        Ok(())
    }

    /// Runs a paused or hibernated sandbox again (a running one is answered as it is); with
    /// `timeout_s`, it then ends that long from now.
    pub async fn resume_sandbox(
        &self,
        caller: &Caller,
        id: &str,
        timeout_s: Option<u64>,
    ) -> Result<SandboxInfo, Error> {
        match timeout_s {
            Some(t) => self.set_sandbox_timeout(caller, id, t).await,
            None => {
                let s = self.awake(caller, id).await?;
                Ok(self.sandbox_info(&s))
            }
        }
    }

    /// Hibernates a durable sandbox now: its record written, nothing of it left running.
    pub async fn hibernate_sandbox(&self, caller: &Caller, id: &str) -> Result<SandboxInfo, Error> {
        let s = match self.get(&caller.tenant, id) {
            Ok(s) => s,
            Err(e) => return self.dormant_info(&caller.tenant, id).ok_or(e),
        };
        if s.sandbox.disk.is_none() {
            return Err(Error::Conflict(
                "this sandbox's files are not on disk, so it cannot hibernate; create it \
                 with lifecycle.durable = true (or a policy that hibernates)"
                    .into(),
            ));
        }
        let slot = self.slot_of(&s.id).ok_or_else(Error::session_not_found)?;
        self.hibernate(&slot, "api", Some(caller)).await?;
        self.dormant_info(&caller.tenant, id)
            .ok_or_else(Error::session_not_found)
    }

    fn slot_of(&self, id: &str) -> Option<Arc<Slot>> {
        self.inner.table.lock().ok()?.by_id.get(id).cloned()
    }

    /// Writes a durable session down and stops it: checkpointed with its memory where the
    /// engine can (the gVisor tier), else with its files only; the record, the audit
    /// (`status`: `memory_kept` or `memory_lost`) and the API say which.
    async fn hibernate(
        &self,
        slot: &Arc<Slot>,
        why: &str,
        by: Option<&Caller>,
    ) -> Result<(), Error> {
        let Some(s) = slot.cell.get() else {
            return Ok(());
        };
        let _waking = self.inner.waking.lock().await;
        // Hibernated (or deleted) meanwhile: the reaper may have seen the sandbox stopped by
        // a checkpoint before it was removed, and must not touch its image.
        if !self.is_listed(slot) {
            return Ok(());
        }
        let Ok(_x) = s.exec_lock.try_lock() else {
            return Err(Error::Conflict(
                "an execution is running in this sandbox; hibernate it once it ends".into(),
            ));
        };
        let Some(store) = self.store() else {
            return Err(Error::internal("a durable sandbox without a store"));
        };
        let begun = Instant::now();
        let since = s.sandbox.paused_since().unwrap_or_else(Instant::now);
        let image = store.checkpoint(&s.id);
        // A frozen sandbox cannot be checkpointed: thawed for it (it is stopped right after).
        if s.sandbox.paused_since().is_some() {
            let _ = s.live.resume();
        }
        let memory_kept = match s.live.checkpoint(&image).await {
            Ok(()) => true,
            Err(crate::engine::EngineError::Unsupported(_)) => false,
            Err(e) => {
                tracing::warn!(sandbox = %s.id, error = %e, "checkpoint failed: hibernating with the files only");
                store.remove_checkpoint(&s.id);
                false
            }
        };
        let mut record = self.record_of(s, Some(now_ms()));
        record.memory_kept = memory_kept;
        if let Err(e) = store.save(&record) {
            store.remove_checkpoint(&s.id);
            if memory_kept {
                // The sandbox is stopped already: it must become dormant all the same.
                record.memory_kept = false;
                let _ = store.save(&record);
            }
            if !memory_kept {
                return Err(Error::internal(format!("hibernating {}: {e}", s.id)));
            }
        }
        let memory = if record.memory_kept {
            "memory_kept"
        } else {
            "memory_lost"
        };
        // Its running time ends here (the record carries it to the usage figures).
        self.audit_session_status(s, Kind::SandboxHibernated, Some(why), by, Some(memory))
            .await;
        if let Ok(mut d) = self.inner.dormant.lock() {
            d.insert(s.id.clone(), Dormant { record, since });
        }
        drop(_x);
        self.remove_and_close(slot).await;
        let seconds = begun.elapsed().as_secs_f64();
        self.inner
            .observer
            .sandbox_transition(&s.pool, "hibernate", seconds);
        tracing::info!(sandbox = %s.id, ms = seconds * 1000.0, reason = why, memory, "sandbox hibernated");
        Ok(())
    }

    /// What the reaper must do to a live session now, if anything.
    pub(crate) fn due(&self, s: &Session, pool: &PoolSettings) -> Option<Due> {
        let life: &Lifecycle = &s.sandbox.lifecycle;
        let durable = s.sandbox.disk.is_some();
        let end = |why| {
            if durable {
                Due::Hibernate(why)
            } else {
                Due::Delete(why)
            }
        };
        // A busy session's death is the execution's to report.
        if !s.busy() && !s.live.alive() {
            return Some(end("sandbox_died"));
        }
        if let Some(max) = Lifecycle::secs(life.max_lifetime_s)
            && s.sandbox
                .created_at
                .unwrap_or(s.created_at)
                .elapsed()
                .is_ok_and(|a| a >= max)
        {
            return Some(Due::Delete("max_lifetime"));
        }
        if let Some(since) = s.sandbox.paused_since() {
            let paused = since.elapsed();
            if Lifecycle::secs(life.delete_after_s).is_some_and(|d| paused >= d) {
                return Some(Due::Delete("delete_after"));
            }
            if durable && Lifecycle::secs(life.hibernate_after_s).is_some_and(|d| paused >= d) {
                return Some(Due::Hibernate("hibernate_after"));
            }
            // Its clocks stop while it is paused.
            return None;
        }
        if s.created.elapsed() >= pool.max_lifetime {
            return Some(end("max_lifetime"));
        }
        if s.sandbox.past_end() {
            return Some(match life.on_timeout {
                Some(OnTimeout::Hibernate) if durable => Due::Hibernate("timeout"),
                _ => Due::Delete("timeout"),
            });
        }
        // Busy in a way the API does not see (code that started a process itself, a thread
        // still computing): its idle time starts again.
        if let Some(cpu) = s.live.cpu_ns()
            && s.sandbox.used_cpu(cpu, BUSY_CPU_NS)
        {
            s.touch();
            return None;
        }
        let idle_after = Lifecycle::secs(life.idle_timeout_s).unwrap_or(pool.idle_timeout);
        // Idle: no execution, no process of its own, no connection to its ports.
        let idle = !s.busy()
            && s.sandbox.running() == 0
            && !s.sandbox.ports_open()
            && s.idle_for() >= idle_after;
        if !idle {
            return None;
        }
        match life.on_idle {
            Some(OnIdle::Pause) => Some(Due::Pause),
            Some(OnIdle::Hibernate) if durable => Some(Due::Hibernate("idle")),
            Some(OnIdle::Hibernate) => Some(Due::Delete("idle_timeout")),
            Some(OnIdle::Delete) => Some(Due::Delete("idle_timeout")),
            // A session ends when idle; a sandbox lives until its timeout however idle.
            None if s.sandbox.end().is_none() => Some(end("idle_timeout")),
            None => None,
        }
    }

    /// Does what [`Manager::due`] said; whether it did.
    pub(crate) async fn act(&self, slot: &Arc<Slot>, due: Due) -> bool {
        let Some(s) = slot.cell.get() else {
            return false;
        };
        match due {
            Due::Pause => match self.pause_now(s, "idle", None).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(sandbox = %s.id, error = %e, "pausing an idle sandbox");
                    false
                }
            },
            Due::Hibernate(why) => match self.hibernate(slot, why, None).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(sandbox = %s.id, error = %e, "hibernating a sandbox");
                    false
                }
            },
            Due::Delete(why) => {
                tracing::info!(session = %s.id, pool = %s.pool, reason = why, "session expired");
                self.audit_session(s, Kind::SessionExpired, Some(why), None)
                    .await;
                self.remove_and_close(slot).await;
                if s.sandbox.disk.is_some() {
                    self.forget_disk(&s.id);
                }
                true
            }
        }
    }

    /// Deletes the hibernated sandboxes whose policy says so; how many.
    pub(crate) async fn reap_dormant(&self) -> usize {
        let due: Vec<(String, String, &'static str)> = match self.inner.dormant.lock() {
            Ok(d) => d
                .values()
                .filter_map(|x| {
                    let life = &x.record.lifecycle;
                    let why = if Lifecycle::secs(life.max_lifetime_s)
                        .is_some_and(|m| since_ms(x.record.created_at_ms) >= m)
                    {
                        "max_lifetime"
                    } else if Lifecycle::secs(life.delete_after_s)
                        .is_some_and(|m| x.since.elapsed() >= m)
                    {
                        "delete_after"
                    } else {
                        return None;
                    };
                    Some((x.record.tenant.clone(), x.record.id.clone(), why))
                })
                .collect(),
            Err(_) => return 0,
        };
        let mut n = 0;
        for (tenant, id, why) in due {
            if self.delete_dormant(&tenant, &id, Some(why), None).await {
                n += 1;
            }
        }
        n
    }

    /// How many sandboxes are in each state, and what the durable ones' disks take.
    pub fn sandbox_counts(&self) -> SandboxCounts {
        let mut c = SandboxCounts::default();
        let live: Vec<Arc<Session>> = self.inner.table.lock().map_or_else(
            |_| Vec::new(),
            |t| {
                t.by_id
                    .values()
                    .filter_map(|s| s.cell.get().cloned())
                    .collect()
            },
        );
        let store = self.store();
        for s in &live {
            if s.sandbox.paused_since().is_some() {
                c.paused += 1;
            } else {
                c.running += 1;
            }
            if s.sandbox.disk.is_some()
                && let Some(st) = store
            {
                c.disk_bytes += st.allocated(&s.id);
            }
        }
        let ids: Vec<String> = self
            .inner
            .dormant
            .lock()
            .map_or_else(|_| Vec::new(), |d| d.keys().cloned().collect());
        c.hibernated = ids.len();
        if let Some(st) = store {
            c.disk_bytes += ids.iter().map(|id| st.allocated(id)).sum::<u64>();
        }
        c
    }

    /// At shutdown, before the sessions are closed: checkpoints a durable session whose
    /// engine can (the gVisor tier) and that runs no execution; whether its memory is kept.
    pub(crate) async fn checkpoint_at_shutdown(&self, s: &Session) -> bool {
        let Some(store) = self.store() else {
            return false;
        };
        let Ok(_x) = s.exec_lock.try_lock() else {
            return false;
        };
        if s.sandbox.paused_since().is_some() {
            let _ = s.live.resume();
        }
        let image = store.checkpoint(&s.id);
        match tokio::time::timeout(SHUTDOWN_CHECKPOINT, s.live.checkpoint(&image)).await {
            Ok(Ok(())) => true,
            Ok(Err(crate::engine::EngineError::Unsupported(_))) => false,
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %s.id, error = %e, "checkpoint at shutdown failed: files only");
                store.remove_checkpoint(&s.id);
                false
            }
            Err(_) => {
                tracing::warn!(sandbox = %s.id, "checkpoint at shutdown timed out: files only");
                store.remove_checkpoint(&s.id);
                false
            }
        }
    }

    /// At shutdown: a durable session is written down as hibernated (the server started
    /// again lists it), with its memory when [`Manager::checkpoint_at_shutdown`] kept it;
    /// whether it was durable.
    pub(crate) async fn hibernate_at_shutdown(&self, s: &Session, memory_kept: bool) -> bool {
        if s.sandbox.disk.is_none() {
            return false;
        }
        let Some(store) = self.store() else {
            return false;
        };
        let mut record = self.record_of(s, Some(now_ms()));
        record.memory_kept = memory_kept;
        if let Err(e) = store.save(&record) {
            tracing::warn!(sandbox = %s.id, error = %e, "recording a sandbox at shutdown");
            store.remove_checkpoint(&s.id);
        }
        let memory = if memory_kept {
            "memory_kept"
        } else {
            "memory_lost"
        };
        self.audit_session_status(
            s,
            Kind::SandboxHibernated,
            Some("shutdown"),
            None,
            Some(memory),
        )
        .await;
        true
    }
}
