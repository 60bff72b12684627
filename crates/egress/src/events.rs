//! The record of a gateway's decisions: each one is logged at once (`tracing`, target
//! `ampoule::egress`) and kept, up to a cap, for the execution's result.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ampoule_types::{EgressEvent, EgressProtocol};

/// Events kept per gateway between two drains; beyond it they are only logged and counted, so
/// a sandbox that floods the gateway cannot grow the supervisor's memory.
const MAX_KEPT: usize = 1000;

/// One gateway's events.
#[derive(Debug)]
pub(crate) struct EventLog {
    label: Mutex<String>,
    /// The session and execution the next decisions belong to (empty when not known).
    context: Mutex<(String, String)>,
    /// `host:port`s an approver let this sandbox reach (approval is asked once per sandbox).
    approved: Mutex<std::collections::HashSet<String>>,
    kept: Mutex<Vec<EgressEvent>>,
    dropped: AtomicU64,
}

/// An event being built.
pub(crate) struct Decision {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) protocol: EgressProtocol,
    pub(crate) allowed: bool,
    pub(crate) reason: String,
    pub(crate) injected: bool,
    pub(crate) address: Option<String>,
}

impl Decision {
    pub(crate) fn blocked(
        host: impl Into<String>,
        port: u16,
        protocol: EgressProtocol,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            protocol,
            allowed: false,
            reason: reason.into(),
            injected: false,
            address: None,
        }
    }
}

impl EventLog {
    pub(crate) fn new(label: &str) -> Self {
        Self {
            label: Mutex::new(label.to_owned()),
            context: Mutex::new((String::new(), String::new())),
            approved: Mutex::new(std::collections::HashSet::new()),
            kept: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_label(&self, label: &str) {
        if let Ok(mut l) = self.label.lock() {
            label.clone_into(&mut l);
        }
    }

    pub(crate) fn set_context(&self, session: &str, execution: &str) {
        if let Ok(mut c) = self.context.lock() {
            *c = (session.to_owned(), execution.to_owned());
        }
    }

    /// The session and execution the decisions belong to now.
    pub(crate) fn context(&self) -> (String, String) {
        self.context.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Whether an approver let this sandbox reach `key` (`host:port`).
    pub(crate) fn is_approved(&self, key: &str) -> bool {
        self.approved.lock().is_ok_and(|a| a.contains(key))
    }

    /// Remembers that an approver let this sandbox reach `key`.
    pub(crate) fn mark_approved(&self, key: String) {
        if let Ok(mut a) = self.approved.lock() {
            a.insert(key);
        }
    }

    pub(crate) fn record(&self, d: Decision) {
        let label = self.label.lock().map(|l| l.clone()).unwrap_or_default();
        let (session, execution) = self.context.lock().map(|c| c.clone()).unwrap_or_default();
        tracing::info!(
            target: "ampoule::egress",
            sandbox = %label,
            session = %session,
            execution = %execution,
            host = %d.host,
            port = d.port,
            protocol = ?d.protocol,
            allowed = d.allowed,
            injected = d.injected,
            address = d.address.as_deref().unwrap_or(""),
            reason = %d.reason,
            "{}",
            if d.allowed { "egress allowed" } else { "egress blocked" }
        );
        let event = EgressEvent {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            host: d.host,
            port: d.port,
            protocol: d.protocol,
            allowed: d.allowed,
            reason: d.reason,
            injected: d.injected,
            address: d.address,
        };
        match self.kept.lock() {
            Ok(mut kept) if kept.len() < MAX_KEPT => kept.push(event),
            _ => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<EgressEvent> {
        self.kept.lock().map(|k| k.clone()).unwrap_or_default()
    }

    pub(crate) fn drain(&self) -> Vec<EgressEvent> {
        self.kept
            .lock()
            .map(|mut k| std::mem::take(&mut *k))
            .unwrap_or_default()
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
