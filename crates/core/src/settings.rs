//! The typed settings the core runs on: each pool's ([`PoolSettings`]), the tenants'
//! session limits ([`TenantLimits`]) and what the audit log keeps ([`AuditPolicy`],
//! [`Audit`]). The server builds them from its TOML config; the core never reads a file.

use std::collections::HashMap;
use std::sync::Arc;

use crate::engine::PoolSpec;
use crate::quota::Quotas;

/// A pool as the session manager uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// What its sessions are made of.
    pub spec: PoolSpec,
    /// Ready sessions kept waiting.
    pub warm: usize,
    /// Most live sessions.
    pub max_sessions: usize,
    /// Idle timeout.
    pub idle_timeout: std::time::Duration,
    /// Maximum lifetime.
    pub max_lifetime: std::time::Duration,
    /// Most seconds one execution may ask for.
    pub max_timeout_s: f64,
    /// What idleness and time do to its sessions and sandboxes (`[pools.X.lifecycle]`).
    pub lifecycle: crate::lifecycle::Lifecycle,
    /// Whether its executions wait for an approver (`[pools.X.approval]`).
    pub approval: crate::approval::ApprovalPolicy,
}

/// What the audit log keeps of one pool's records, `[audit]` and `[pools.NAME.audit]`
/// resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditPolicy {
    /// Keep the code (else only its SHA-256).
    pub keep_code: bool,
    /// Bytes of stdout and of stderr kept.
    pub output_bytes: usize,
    /// Days records are kept.
    pub retention_days: u64,
}

/// Limits that are not a pool's.
#[derive(Debug, Clone, Default)]
pub struct TenantLimits {
    /// Most sessions per tenant unless overridden.
    pub default: Option<usize>,
    /// Per-tenant overrides.
    pub per_tenant: HashMap<String, usize>,
    /// Executions per minute, allowed pools and languages, longest timeout.
    pub quotas: Arc<Quotas>,
}

/// Where the manager writes down executions and session events (see `ampoule-audit`).
#[derive(Clone)]
pub struct Audit {
    /// The write path (batched, off the executions' path).
    pub writer: ampoule_audit::Writer,
    /// The store, for queries.
    pub store: Arc<dyn ampoule_audit::AuditStore>,
    /// Keep each execution's code (else only its SHA-256).
    pub keep_code: bool,
    /// Bytes of stdout and of stderr kept per record.
    pub output_bytes: usize,
    /// Pools whose records are kept otherwise (`[pools.NAME.audit]`).
    pub per_pool: HashMap<String, AuditPolicy>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("keep_code", &self.keep_code)
            .field("output_bytes", &self.output_bytes)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// What is kept of `pool`'s records: `(keep_code, output_bytes)`.
    pub fn policy(&self, pool: &str) -> (bool, usize) {
        self.per_pool
            .get(pool)
            .map_or((self.keep_code, self.output_bytes), |p| {
                (p.keep_code, p.output_bytes)
            })
    }
}
