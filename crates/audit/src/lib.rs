//! The audit log: every execution, session lifecycle event and egress decision, written down
//! so it can be answered for after the fact (PRODUCT.md §6).
//!
//! - [`Record`] is what is written; [`StoredRecord`] is what a query returns.
//! - [`AuditStore`] is the one trait behind which the store lives: [`SqlStore`] implements it
//!   on SQLite (embedded, the default, WAL) and PostgreSQL, with the same SQL on both.
//! - [`Writer`] keeps the write path off the executions' path: records go through a bounded
//!   channel to one task that inserts them in batches, one transaction per batch.
//!
//! Invariants: the store is append-only from the API's point of view; each record stores
//! `hash = sha256(prev_hash || body)` where `body` is the record's canonical JSON, so an
//! edited, inserted or deleted record breaks the chain ([`AuditStore::verify`]). Pruning only
//! removes a prefix of the chain and records the hash of its last record as the anchor the
//! remaining chain starts from.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A library prints nothing: the CLI's printer owns stdout and stderr.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

mod error;
mod record;
mod sql;
mod writer;

pub use error::Error;
pub use record::{
    EgressDecision, Filter, Kind, Page, Record, StoredRecord, Usage, Verification, sha256_hex, trim,
};
pub use sql::SqlStore;
pub use writer::Writer;

/// What a rate window shared by several servers said ([`AuditStore::admit_rate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateAdmission {
    /// This store keeps no shared window (SQLite: one server): count locally.
    NotShared,
    /// Counted: the event is in the window.
    Admitted,
    /// The window is full; the oldest event leaves it in this many milliseconds.
    Refused {
        /// Milliseconds until a place frees.
        retry_after_ms: i64,
    },
}

/// The audit store: SQLite or PostgreSQL behind the same queries.
#[async_trait::async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Appends records in order, in one transaction, extending the hash chain.
    async fn append(&self, records: &[Record]) -> Result<(), Error>;
    /// One page of a tenant's records matching `filter`, oldest first.
    async fn query(&self, filter: &Filter) -> Result<Page, Error>;
    /// Walks the whole chain and reports the first break, if any.
    async fn verify(&self) -> Result<Verification, Error>;
    /// Removes the records older than `before_ms` (a prefix of the chain) and anchors the
    /// rest on the last removed record's hash. Returns how many were removed.
    async fn prune(&self, before_ms: i64) -> Result<u64, Error>;
    /// Retention per pool: removes the longest prefix of the chain in which every record is
    /// past its own retention, i.e. older than its pool's cutoff in `per_pool` (milliseconds
    /// since the epoch), or than `before_ms` for other pools. The chain can only lose a
    /// prefix (that is what keeps it verifiable), so a record is never removed before its
    /// retention, but may be kept longer while an older record of a longer-kept pool is
    /// still there. Returns how many were removed.
    async fn prune_retention(
        &self,
        before_ms: i64,
        per_pool: &[(String, i64)],
    ) -> Result<u64, Error>;
    /// A tenant's usage between two times (milliseconds since the epoch).
    async fn usage(&self, tenant: &str, since_ms: i64, until_ms: i64) -> Result<Usage, Error>;
    /// A sliding window shared by every server on this store: counts one event of `key` at
    /// `now_ms` unless `max` of them happened in the `window_ms` before (a refused event is
    /// not counted). Default: [`RateAdmission::NotShared`].
    async fn admit_rate(
        &self,
        _key: &str,
        _max: u32,
        _window_ms: i64,
        _now_ms: i64,
    ) -> Result<RateAdmission, Error> {
        Ok(RateAdmission::NotShared)
    }
}
