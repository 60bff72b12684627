//! Kernel objects Linux counts per user, not per cgroup, and how each zygote-born sandbox gets a
//! share of its own.
//!
//! Two kinds of per-user counters exist:
//! * `user_struct` counters, keyed by the host uid alone: pipe buffer pages
//!   (`fs.pipe-user-pages-soft`), epoll watches, locked shared memory. A sandbox with a host uid
//!   of its own (its slot's, [`crate::Host::ids_for`]) has its own.
//! * `ucounts`, kept per (user namespace, uid) and charged up the tree of user namespaces: at
//!   each ancestor level the charge goes to the *owner* of the namespace below (whoever created
//!   it), checked against a maximum of that level. Inotify instances and watches, user and
//!   other namespaces, and the rlimit-like counters (`RLIMIT_SIGPENDING`, `RLIMIT_MSGQUEUE`,
//!   `RLIMIT_MEMLOCK`, `RLIMIT_NPROC`) are of this kind. A cold sandbox's user namespace is
//!   created by its own host uid, so the host-level charge is per sandbox. A zygote-born one
//!   lives in a namespace below the zygote's: whatever its uid, the host level charges every
//!   child of a zygote to the zygote's owner, together.
//!
//! So a zygote-born sandbox gets its own share in three steps:
//! 1. its own host uid: the zygote's namespace maps every slot's uid
//!    ([`crate::Host::zygote_id_map`]) and the child switches to its slot's before it creates
//!    its own user namespace — which makes it the owner charged at the zygote's level;
//! 2. a per-owner maximum at the zygote's level: for inotify, the zygote namespace's own
//!    `/proc/sys/user/max_inotify_*` ([`ZYGOTE_USERNS_LIMITS`]); for the rlimit-like counters,
//!    the child's own rlimits when it creates its namespace ([`UserRlimits`]);
//! 3. room at the host level, where all of a zygote's children are charged to its owner: for
//!    the rlimit-like counters, the zygote's rlimits when its namespace is created
//!    ([`UserRlimits::for_zygote`]): unlimited where ampoule may raise hard limits, else the
//!    supervisor's hard limits, and then each child gets at most an equal share of them
//!    ([`UserRlimits::per_child`]); for inotify, the host's per-user maximums
//!    (`fs.inotify.max_user_*`, one value for every user) are raised, when lower, to what the
//!    zygote's children may hold together ([`ensure_host_room`]).
//!
//! Namespaces cannot be created by the sandboxed code (seccomp), so their counters only ever
//! hold what ampoule itself creates.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Inotify instances one sandbox may hold (the kernel's default per user).
pub const SESSION_INOTIFY_INSTANCES: u64 = 128;
/// Inotify watches one sandbox may hold.
pub const SESSION_INOTIFY_WATCHES: u64 = 65_536;

/// The limits of a zygote's user namespace, per owner below it (see the module docs).
pub const ZYGOTE_USERNS_LIMITS: [(&str, u64); 2] = [
    ("max_inotify_instances", SESSION_INOTIFY_INSTANCES),
    ("max_inotify_watches", SESSION_INOTIFY_WATCHES),
];

const HOST_INOTIFY_INSTANCES: &str = "/proc/sys/fs/inotify/max_user_instances";
const HOST_INOTIFY_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";

/// The rlimits whose value, when a user namespace is created, also bounds the counter of its
/// owner one level up (`RLIMIT_SIGPENDING`, `RLIMIT_MSGQUEUE`, `RLIMIT_MEMLOCK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRlimits {
    /// Signals queued to the sandbox's processes.
    pub sigpending: u64,
    /// Bytes of POSIX message queues.
    pub msgqueue: u64,
    /// Bytes of locked memory.
    pub memlock: u64,
}

impl UserRlimits {
    /// No limit.
    pub const UNLIMITED: Self = Self {
        sigpending: libc::RLIM_INFINITY,
        msgqueue: libc::RLIM_INFINITY,
        memlock: libc::RLIM_INFINITY,
    };

    /// This process's soft (`hard == false`) or hard limits.
    fn read(hard: bool) -> Self {
        use nix::sys::resource::{Resource, getrlimit};
        let get = |r, default| {
            getrlimit(r)
                .map(|(soft, max)| if hard { max } else { soft })
                .unwrap_or(default)
        };
        Self {
            sigpending: get(Resource::RLIMIT_SIGPENDING, 4_096),
            msgqueue: get(Resource::RLIMIT_MSGQUEUE, 819_200),
            memlock: get(Resource::RLIMIT_MEMLOCK, 8 << 20),
        }
    }

    /// This process's soft limits: what a cold sandbox inherits.
    pub fn current() -> Self {
        Self::read(false)
    }

    /// What a zygote's namespace is created with, the ceiling of all its children together:
    /// none where this process may raise its hard limits (`CAP_SYS_RESOURCE`, which root in a
    /// container may lack), else its hard limits.
    pub fn for_zygote() -> Self {
        let can_raise = caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_SYS_RESOURCE,
        )
        .unwrap_or(false);
        if can_raise {
            Self::UNLIMITED
        } else {
            Self::read(true)
        }
    }

    /// What each of a zygote's `children` gets: what a cold sandbox gets, but never more than
    /// an equal share of the zygote's ceiling (`zygote`, one share kept for the zygote), so
    /// that no child can take another's.
    pub fn per_child(zygote: Self, children: u64) -> Self {
        let share = |total: u64, own: u64| {
            if total == libc::RLIM_INFINITY {
                own
            } else {
                own.min(total / children.saturating_add(1))
            }
        };
        let own = Self::current();
        Self {
            sigpending: share(zygote.sigpending, own.sigpending),
            msgqueue: share(zygote.msgqueue, own.msgqueue),
            memlock: share(zygote.memlock, own.memlock),
        }
    }
}

/// A host-wide per-user maximum raised for a zygote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raised {
    /// The sysctl file.
    pub path: &'static str,
    /// Its value before.
    pub from: u64,
    /// Its value now.
    pub to: u64,
}

/// Makes room at the host level for `children` zygote-born sandboxes at their inotify limits
/// (plus the zygote itself): raises `fs.inotify.max_user_instances` and `max_user_watches` where
/// they are lower, never lowers them. These are maximums per user, one value for every user of
/// the host; ampoule's sandbox uids are its own. Returns what it raised. Needs real root.
pub fn ensure_host_room(children: u64) -> Result<Vec<Raised>> {
    let holders = children.saturating_add(1);
    let mut raised = Vec::new();
    for (path, per_session) in [
        (HOST_INOTIFY_INSTANCES, SESSION_INOTIFY_INSTANCES),
        (HOST_INOTIFY_WATCHES, SESSION_INOTIFY_WATCHES),
    ] {
        // The sysctl is an int.
        let want = per_session.saturating_mul(holders).min(i32::MAX as u64);
        let have = read_u64(Path::new(path))?;
        if have < want {
            std::fs::write(path, want.to_string())
                .map_err(|e| Error::io(format!("raising {path} to {want}"), e))?;
            raised.push(Raised {
                path,
                from: have,
                to: want,
            });
        }
    }
    Ok(raised)
}

/// The host's per-user inotify maximums (instances, watches), for `doctor`.
pub fn host_inotify_limits() -> Result<(u64, u64)> {
    Ok((
        read_u64(Path::new(HOST_INOTIFY_INSTANCES))?,
        read_u64(Path::new(HOST_INOTIFY_WATCHES))?,
    ))
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Invalid(format!("{}: not a number: {text:?}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_share_a_finite_ceiling_and_keep_their_own_under_none() {
        let ceiling = UserRlimits {
            sigpending: 1_000,
            msgqueue: 1_000_000,
            memlock: 10,
        };
        let each = UserRlimits::per_child(ceiling, 9);
        let own = UserRlimits::current();
        assert_eq!(each.sigpending, own.sigpending.min(100));
        assert_eq!(each.msgqueue, own.msgqueue.min(100_000));
        assert_eq!(each.memlock, own.memlock.min(1));
        assert_eq!(UserRlimits::per_child(UserRlimits::UNLIMITED, 9), own);
    }

    #[test]
    fn the_current_limits_are_read() {
        let now = UserRlimits::current();
        assert!(now.sigpending > 0 && now.msgqueue > 0);
    }

    #[test]
    fn host_limits_are_readable_here() {
        let (instances, watches) = host_inotify_limits().unwrap();
        assert!(instances > 0 && watches > 0);
    }
}
