//! Approval checkpoints: a pool whose `[pools.X.approval] mode = "always"` holds each
//! execution, after the tenant's policy, timeout and rate have admitted it and before any
//! sandbox is started for it, until a key with the approver role of the same tenant approves
//! it (then it runs) or denies it (403 `denied`), or `timeout_s` passes (408
//! `approval_timed_out`). The code of a denied or expired execution never runs.
//!
//! With `mode = "on_egress"` executions run at once, and the first connection of a sandbox to
//! a host of `hosts` waits in the egress gateway until an approver decides
//! ([`Manager::approve_egress`]); approved, the sandbox reaches that host from then on, denied
//! or expired, that connection is refused (the execution sees a refused connection and the
//! decision is in its egress record). The execution's own timeout keeps running meanwhile.
//!
//! Invariants: a pending approval belongs to its tenant (another tenant's approver sees and
//! decides nothing of it); it is decided once (the decision removes it); a waiter that goes
//! away (its client disconnected) takes its approval with it; every request and decision is
//! in the audit chain (`approval_requested`, `approval_decided` with the approver's key id).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ampoule_audit::{Kind, Record};
use serde::{Deserialize, Serialize};

use crate::caller::Caller;
use crate::error::Error;
use crate::manager::{Manager, now_ms, random_hex};

/// `[pools.X.approval]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalPolicy {
    /// `never` (default) or `always`.
    #[serde(default)]
    pub mode: ApprovalMode,
    /// Seconds an execution waits for a decision (default 300).
    pub timeout_s: Option<f64>,
    /// `http://` URL told of each request (a JSON POST), e.g. a chat bot's hook.
    pub webhook_url: Option<String>,
    /// With `on_egress`: the hosts (`name`, `name:port`, `*.domain`) whose first connection
    /// from a sandbox waits for an approver.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// When executions wait for an approver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalMode {
    /// Never (the default).
    #[default]
    Never,
    /// Every execution.
    Always,
    /// The first connection of a sandbox to one of `hosts`.
    OnEgress,
}

impl ApprovalPolicy {
    /// The wait, checked.
    pub fn timeout(&self) -> Result<Duration, String> {
        let t = self.timeout_s.unwrap_or(300.0);
        if t.is_finite() && t > 0.0 && t <= 86_400.0 {
            Ok(Duration::from_secs_f64(t))
        } else {
            Err("approval.timeout_s must be above 0 and at most 86400".into())
        }
    }
}

/// A pending approval, as approvers see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalInfo {
    /// Its id (`apr_…`).
    pub id: String,
    /// The pool.
    pub pool: String,
    /// The caller's name of the session.
    pub identifier: String,
    /// The execution it holds (`exe_…`; its audit record will carry it).
    pub execution_id: String,
    /// The code that would run.
    pub code: String,
    /// The caller's context, when it sent one.
    pub context: Option<serde_json::Value>,
    /// The submitting key's id.
    pub requested_by: Option<String>,
    /// When it was asked (milliseconds since the epoch).
    pub requested_at_ms: i64,
    /// When it expires unanswered.
    pub expires_at_ms: i64,
    /// For a connection waiting in the egress gateway (`on_egress`): `host:port`.
    pub egress: Option<String>,
}

/// What an approver said.
#[derive(Debug, Clone)]
enum Decision {
    Approved,
    Denied(Option<String>),
}

/// A pending approval and its waiter.
pub(crate) struct Pending {
    tenant: String,
    info: ApprovalInfo,
    tx: tokio::sync::oneshot::Sender<Decision>,
}

/// The pending approvals of every tenant.
pub(crate) type PendingTable = Mutex<HashMap<String, Pending>>;

/// Told of each approval request: the pool's webhook URL and the request as JSON.
pub type ApprovalHook = Arc<dyn Fn(&str, serde_json::Value) + Send + Sync>;

/// Removes a pending approval when its waiter goes away.
struct Waiting<'a> {
    table: &'a PendingTable,
    id: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.lock() {
            t.remove(&self.id);
        }
    }
}

/// What an approval request is about.
pub(crate) struct Ask<'a> {
    pub pool: &'a str,
    pub identifier: &'a str,
    pub session: &'a str,
    pub code: &'a str,
    pub execution_id: &'a str,
}

impl Manager {
    /// Holds the execution until it is approved; `Err` when it is denied or nobody decides
    /// in time. A no-op for pools without approval.
    pub(crate) async fn await_approval(&self, caller: &Caller, ask: Ask<'_>) -> Result<(), Error> {
        let policy = self.pool(ask.pool)?.approval.clone();
        if policy.mode != ApprovalMode::Always {
            return Ok(());
        }
        self.hold(caller, ask, &policy, None).await
    }

    /// A connection of session `session` (running `execution`) to `host:port`, which its
    /// pool's `on_egress` approval names: waits for an approver. `Err` says why it may not.
    pub async fn approve_egress(
        &self,
        session: &str,
        execution: &str,
        host: &str,
        port: u16,
    ) -> Result<(), String> {
        let Some(s) = self.get_any_tenant(session) else {
            return Err("the connection belongs to no live session".into());
        };
        let policy = self
            .pool(&s.pool)
            .map_err(|e| e.to_string())?
            .approval
            .clone();
        if policy.mode != ApprovalMode::OnEgress {
            return Ok(());
        }
        let code = format!("connect to {host}:{port}");
        let ask = Ask {
            pool: &s.pool,
            identifier: &s.identifier,
            session: &s.id,
            code: &code,
            execution_id: execution,
        };
        self.hold(
            &Caller::new(s.tenant.clone()),
            ask,
            &policy,
            Some(format!("{host}:{port}")),
        )
        .await
        .map_err(|e| match e {
            Error::Denied(why) => format!("an approver denied this connection{why}"),
            Error::ApprovalTimedOut(t) => format!("no approver decided within {t} s"),
            other => other.to_string(),
        })
    }

    /// Registers an approval and waits for its decision.
    async fn hold(
        &self,
        caller: &Caller,
        ask: Ask<'_>,
        policy: &ApprovalPolicy,
        egress: Option<String>,
    ) -> Result<(), Error> {
        let timeout = policy.timeout().map_err(Error::invalid)?;
        let id = format!("apr_{}", random_hex(12));
        let now = now_ms();
        let info = ApprovalInfo {
            id: id.clone(),
            pool: ask.pool.to_owned(),
            identifier: ask.identifier.to_owned(),
            execution_id: ask.execution_id.to_owned(),
            code: ask.code.to_owned(),
            context: caller.context.as_ref().map(|c| c.value()),
            requested_by: caller.key_id.clone(),
            requested_at_ms: now,
            expires_at_ms: now + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
            egress,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let table = &self.inner.approvals;
        if let Ok(mut t) = table.lock() {
            t.insert(
                id.clone(),
                Pending {
                    tenant: caller.tenant.clone(),
                    info: info.clone(),
                    tx,
                },
            );
        }
        let _waiting = Waiting {
            table,
            id: id.clone(),
        };
        tracing::info!(approval = %id, pool = ask.pool, execution = ask.execution_id, "execution waits for an approver");
        let mut r = self.approval_record(Kind::ApprovalRequested, &caller.tenant, &ask, &id);
        caller.stamp(&mut r);
        r.status = Some("pending".into());
        self.write_audit_record(r).await;
        if let (Some(url), Some(hook)) = (&policy.webhook_url, self.inner.approval_hook.get()) {
            hook(
                url,
                serde_json::json!({"approval": info, "tenant": caller.tenant}),
            );
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Decision::Approved)) => Ok(()),
            Ok(Ok(Decision::Denied(reason))) => Err(Error::Denied(
                reason.map(|r| format!(" ({r})")).unwrap_or_default(),
            )),
            // The table was dropped: the server is stopping.
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => {
                let mut r = self.approval_record(Kind::ApprovalDecided, &caller.tenant, &ask, &id);
                r.status = Some("timed_out".into());
                r.decided_by = Some("approval_timeout".into());
                r.request_id = caller.request_id.clone();
                self.write_audit_record(r).await;
                Err(Error::ApprovalTimedOut(timeout.as_secs_f64()))
            }
        }
    }

    fn approval_record(&self, kind: Kind, tenant: &str, ask: &Ask<'_>, id: &str) -> Record {
        let mut r = Record::new(kind, now_ms(), tenant, ask.pool, ask.session);
        r.execution = Some(ask.execution_id.to_owned());
        r.identifier = Some(id.to_owned());
        r.code_sha256 = Some(ampoule_audit::sha256_hex(ask.code.as_bytes()));
        if kind == Kind::ApprovalRequested && self.audit().is_some_and(|a| a.policy(ask.pool).0) {
            r.code = Some(ask.code.to_owned());
        }
        r
    }

    /// Sends every approval request of a pool with a `webhook_url` to `hook` (once).
    pub fn set_approval_hook(&self, hook: ApprovalHook) {
        let _ = self.inner.approval_hook.set(hook);
    }

    /// The caller's tenant's pending approvals, oldest first.
    pub fn list_approvals(&self, caller: &Caller) -> Vec<ApprovalInfo> {
        let mut out: Vec<ApprovalInfo> = self
            .inner
            .approvals
            .lock()
            .map(|t| {
                t.values()
                    .filter(|p| p.tenant == caller.tenant)
                    .map(|p| p.info.clone())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|a| a.requested_at_ms);
        out
    }

    /// Decides a pending approval of the caller's tenant (the caller is an approver: the door
    /// checked its key's role). Written down with the approver's key id.
    pub async fn decide_approval(
        &self,
        caller: &Caller,
        id: &str,
        approve: bool,
        reason: Option<String>,
    ) -> Result<ApprovalInfo, Error> {
        let pending = self.inner.approvals.lock().ok().and_then(|mut t| {
            if t.get(id).is_some_and(|p| p.tenant == caller.tenant) {
                t.remove(id)
            } else {
                None
            }
        });
        let Some(p) = pending else {
            return Err(Error::ApprovalNotFound(id.to_owned()));
        };
        let ask = Ask {
            pool: &p.info.pool,
            identifier: &p.info.identifier,
            session: "",
            code: &p.info.code,
            execution_id: &p.info.execution_id,
        };
        let mut r = self.approval_record(Kind::ApprovalDecided, &caller.tenant, &ask, id);
        r.request_id = caller.request_id.clone();
        r.key_id = caller.key_id.clone();
        r.status = Some(if approve { "approved" } else { "denied" }.into());
        r.decided_by = reason.clone();
        self.write_audit_record(r).await;
        tracing::info!(approval = %id, approved = approve, approver = caller.key_id.as_deref().unwrap_or("-"), "approval decided");
        let decision = if approve {
            Decision::Approved
        } else {
            Decision::Denied(reason)
        };
        // The waiter may have gone (its client disconnected): the decision is still written.
        let _ = p.tx.send(decision);
        Ok(p.info)
    }
}
