//! Per-tenant quotas and policy (`[quotas]`, `[tenants.NAME]`): executions per minute, the
//! pools and languages a tenant may use, the longest timeout it may ask for. The most
//! sessions per tenant is counted by the manager's table (`TenantLimits`), where sessions are
//! reserved.
//!
//! Invariants: every refusal is an [`Error`] with a stable code (`rate_limited` with the
//! seconds to wait, `pool_not_allowed`, `language_not_allowed`, `timeout_not_allowed`); the
//! rate is a sliding window — at most `executions_per_minute` executions start in any 60
//! seconds — so the window never holds more than that many instants per tenant; a refused
//! execution takes no place in the window.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ampoule_types::Language;

use crate::error::Error;

/// The window of `executions_per_minute`.
const WINDOW: Duration = Duration::from_secs(60);

/// The window of the cost budgets.
const HOUR: Duration = Duration::from_secs(3600);

/// What one tenant spent in the last hour.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    /// CPU seconds.
    pub cpu_seconds: f64,
    /// Peak memory (GiB) × duration (s), summed over executions.
    pub memory_gib_seconds: f64,
}

/// One tenant's policy; `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Most executions started in any 60 seconds.
    pub executions_per_minute: Option<u32>,
    /// The pools it may use.
    pub pools: Option<Vec<String>>,
    /// The languages it may use.
    pub languages: Option<Vec<Language>>,
    /// The longest timeout it may ask for, in seconds.
    pub max_timeout_s: Option<f64>,
    /// Most MiB the disks of its durable sandboxes may take together (each counted at its
    /// pool's disk limit, running or hibernated); `None`: [`DEFAULT_DURABLE_DISK_MIB`].
    pub durable_disk_mib: Option<u64>,
    /// CPU seconds its executions may use in any hour (measured by the sandboxes' cgroups).
    pub cpu_seconds_per_hour: Option<f64>,
    /// Memory-time its executions may use in any hour: each execution's peak memory (GiB)
    /// times its duration (s).
    pub memory_gib_seconds_per_hour: Option<f64>,
    /// What happens to an execution that starts with less CPU budget left than its timeout:
    /// `false` (default) it runs to its end (the budget goes negative, and the next is
    /// refused); `true` its timeout is cut to the CPU seconds left.
    pub stop_at_budget: bool,
}

/// The default of [`Policy::durable_disk_mib`]: 32 disks of the default 1 GiB.
pub const DEFAULT_DURABLE_DISK_MIB: u64 = 32 * 1024;

/// Every tenant's policy and the rate windows.
#[derive(Debug, Default)]
pub struct Quotas {
    default: Policy,
    per_tenant: HashMap<String, Policy>,
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Per tenant with a budget: what each execution of the last hour spent.
    spent: Mutex<HashMap<String, VecDeque<(Instant, Spent)>>>,
}

impl Quotas {
    /// `default` for every tenant not in `per_tenant`.
    pub fn new(default: Policy, per_tenant: HashMap<String, Policy>) -> Self {
        Self {
            default,
            per_tenant,
            windows: Mutex::new(HashMap::new()),
            spent: Mutex::new(HashMap::new()),
        }
    }

    /// The policy of `tenant`.
    pub fn policy(&self, tenant: &str) -> &Policy {
        self.per_tenant.get(tenant).unwrap_or(&self.default)
    }

    /// Whether `tenant` may use `pool`, whose sessions run `language`.
    pub fn check_pool(&self, tenant: &str, pool: &str, language: Language) -> Result<(), Error> {
        let p = self.policy(tenant);
        if let Some(pools) = &p.pools
            && !pools.iter().any(|x| x == pool)
        {
            return Err(Error::PoolNotAllowed(pool.to_owned()));
        }
        if let Some(langs) = &p.languages
            && !langs.contains(&language)
        {
            return Err(Error::LanguageNotAllowed(language));
        }
        Ok(())
    }

    /// The timeout of one execution under the tenant's maximum: a request above it is
    /// refused; a default (`requested` absent) above it is cut to it.
    pub fn timeout(
        &self,
        tenant: &str,
        requested: Option<f64>,
        default: f64,
    ) -> Result<f64, Error> {
        let Some(max) = self.policy(tenant).max_timeout_s else {
            return Ok(requested.unwrap_or(default));
        };
        match requested {
            Some(t) if t > max => Err(Error::TimeoutNotAllowed { max }),
            Some(t) => Ok(t),
            None => Ok(default.min(max)),
        }
    }

    /// Counts one execution of `tenant`, or refuses it when the tenant started
    /// `executions_per_minute` in the last 60 seconds (429 with `Retry-After`: the seconds
    /// until the oldest of them leaves the window, rounded up).
    pub fn admit_execution(&self, tenant: &str) -> Result<(), Error> {
        self.check_budget(tenant)?;
        let Some(max) = self.policy(tenant).executions_per_minute else {
            return Ok(());
        };
        let now = Instant::now();
        let mut windows = self
            .windows
            .lock()
            .map_err(|_| Error::internal("rate windows poisoned"))?;
        let window = windows.entry(tenant.to_owned()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            window.pop_front();
        }
        if window.len() >= max as usize {
            let wait = window
                .front()
                .map_or(WINDOW, |t| WINDOW.saturating_sub(now.duration_since(*t)));
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(Error::RateLimited {
                max,
                retry_after_s: secs.max(1),
            });
        }
        window.push_back(now);
        Ok(())
    }
}

impl Quotas {
    fn has_budget(&self, tenant: &str) -> bool {
        let p = self.policy(tenant);
        p.cpu_seconds_per_hour.is_some() || p.memory_gib_seconds_per_hour.is_some()
    }

    /// Records what one execution of `tenant` spent (only for tenants with a budget).
    pub fn charge(&self, tenant: &str, spent: Spent) {
        if !self.has_budget(tenant) {
            return;
        }
        if let Ok(mut all) = self.spent.lock() {
            let q = all.entry(tenant.to_owned()).or_default();
            let now = Instant::now();
            while q
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) >= HOUR)
            {
                q.pop_front();
            }
            q.push_back((now, spent));
        }
    }

    /// What `tenant` spent in the last hour (zero for a tenant without a budget).
    pub fn spent(&self, tenant: &str) -> Spent {
        let now = Instant::now();
        let Ok(all) = self.spent.lock() else {
            return Spent::default();
        };
        let mut out = Spent::default();
        for (t, s) in all.get(tenant).into_iter().flatten() {
            if now.duration_since(*t) < HOUR {
                out.cpu_seconds += s.cpu_seconds;
                out.memory_gib_seconds += s.memory_gib_seconds;
            }
        }
        out
    }

    /// Refuses when a budget of `tenant` is spent (429 `quota_exhausted`, with the seconds
    /// until enough of the hour has passed for the spending to fall below it).
    pub fn check_budget(&self, tenant: &str) -> Result<(), Error> {
        if !self.has_budget(tenant) {
            return Ok(());
        }
        let p = self.policy(tenant);
        let used = self.spent(tenant);
        let over = [
            (
                "cpu_seconds_per_hour",
                p.cpu_seconds_per_hour,
                used.cpu_seconds,
            ),
            (
                "memory_gib_seconds_per_hour",
                p.memory_gib_seconds_per_hour,
                used.memory_gib_seconds,
            ),
        ]
        .into_iter()
        .find_map(|(what, max, used)| max.filter(|m| used >= *m).map(|m| (what, m, used)));
        let Some((what, max, used)) = over else {
            return Ok(());
        };
        // When the oldest spending has left the hour enough to be under the budget again.
        let now = Instant::now();
        let mut left = used;
        let mut wait = HOUR;
        if let Ok(all) = self.spent.lock() {
            for (t, s) in all.get(tenant).into_iter().flatten() {
                left -= match what {
                    "cpu_seconds_per_hour" => s.cpu_seconds,
                    _ => s.memory_gib_seconds,
                };
                if left < max {
                    wait = HOUR.saturating_sub(now.duration_since(*t));
                    break;
                }
            }
        }
        Err(Error::QuotaExhausted {
            what,
            used,
            max,
            retry_after_s: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
        })
    }

    /// With `stop_at_budget`: the CPU seconds `tenant` has left this hour.
    pub fn cpu_left(&self, tenant: &str) -> Option<f64> {
        let p = self.policy(tenant);
        if !p.stop_at_budget {
            return None;
        }
        let max = p.cpu_seconds_per_hour?;
        Some((max - self.spent(tenant).cpu_seconds).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::error::ErrorCode;

    fn quotas(p: Policy) -> Quotas {
        Quotas::new(Policy::default(), HashMap::from([("a".to_owned(), p)]))
    }

    #[test]
    fn the_window_admits_n_then_refuses_with_retry_after() {
        let q = quotas(Policy {
            executions_per_minute: Some(3),
            ..Policy::default()
        });
        for _ in 0..3 {
            q.admit_execution("a").unwrap();
        }
        let e = q.admit_execution("a").unwrap_err();
        assert_eq!(e.code(), ErrorCode::RateLimited);
        let after = e.retry_after_s().unwrap();
        assert!((1..=60).contains(&after), "{after}");
        // Refusals take no place; other tenants have no limit.
        assert!(q.admit_execution("a").is_err());
        for _ in 0..100 {
            q.admit_execution("b").unwrap();
        }
    }

    #[test]
    fn pools_languages_and_timeouts() {
        let q = quotas(Policy {
            pools: Some(vec!["python".into()]),
            languages: Some(vec![Language::Python]),
            max_timeout_s: Some(10.0),
            ..Policy::default()
        });
        q.check_pool("a", "python", Language::Python).unwrap();
        let e = q.check_pool("a", "js", Language::Javascript).unwrap_err();
        assert_eq!(e.code(), ErrorCode::PoolNotAllowed);
        let q2 = quotas(Policy {
            languages: Some(vec![Language::Python]),
            ..Policy::default()
        });
        let e = q2.check_pool("a", "js", Language::Javascript).unwrap_err();
        assert_eq!(e.code(), ErrorCode::LanguageNotAllowed);
        assert_eq!(q.timeout("a", None, 220.0).unwrap(), 10.0);
        assert_eq!(q.timeout("a", Some(5.0), 220.0).unwrap(), 5.0);
        let e = q.timeout("a", Some(11.0), 220.0).unwrap_err();
        assert_eq!(e.code(), ErrorCode::TimeoutNotAllowed);
        assert_eq!(q.timeout("b", Some(500.0), 220.0).unwrap(), 500.0);
    }

    #[test]
    fn a_spent_cpu_budget_refuses_with_the_wait_and_spares_others() {
        let mut per_tenant = HashMap::new();
        per_tenant.insert(
            "a".to_owned(),
            Policy {
                cpu_seconds_per_hour: Some(2.0),
                stop_at_budget: true,
                ..Policy::default()
            },
        );
        let q = Quotas::new(Policy::default(), per_tenant);
        assert!(q.admit_execution("a").is_ok());
        assert_eq!(q.cpu_left("a"), Some(2.0));
        q.charge(
            "a",
            Spent {
                cpu_seconds: 1.5,
                memory_gib_seconds: 0.1,
            },
        );
        assert!(q.admit_execution("a").is_ok());
        assert_eq!(q.cpu_left("a"), Some(0.5));
        q.charge(
            "a",
            Spent {
                cpu_seconds: 0.6,
                memory_gib_seconds: 0.1,
            },
        );
        let e = q.admit_execution("a").unwrap_err();
        assert_eq!(e.code(), ErrorCode::QuotaExhausted);
        assert!(e.is_policy());
        let wait = e.retry_after_s().unwrap();
        assert!((3590..=3600).contains(&wait), "{wait}");
        assert!(e.to_string().contains("cpu_seconds_per_hour"), "{e}");
        // Another tenant, without a budget, is neither refused nor tracked.
        q.charge(
            "b",
            Spent {
                cpu_seconds: 100.0,
                memory_gib_seconds: 100.0,
            },
        );
        assert!(q.admit_execution("b").is_ok());
        assert_eq!(q.spent("b"), Spent::default());
        assert_eq!(q.cpu_left("b"), None);
    }
}
