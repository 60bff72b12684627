//! Where a parent and its just-forked child run while both work (see [`CpuSplit`]).

use nix::unistd::Pid;

/// The CPUs this process may use, while [`CpuSplit::apply`] has narrowed it and its child
/// (each process's own copy); [`rejoin`] restores them.
static ALL_CPUS: std::sync::Mutex<Option<nix::sched::CpuSet>> = std::sync::Mutex::new(None);

/// A parent and the child it just forked on different CPUs while both have work of their own:
/// the supervisor and its forked-ahead init until the init has its handover (the spec, the
/// cgroups and the scratch files on one side, the namespaces and the root on the other).
/// (The same split of the outer init and pid 1, the `/proc` masks beside pid 1's steps, gained
/// nothing measurable: those steps are short.)
///
/// Left to itself, a scheduler may serialise them on one CPU with another idle: a forked child
/// can be placed on its parent's CPU, and a wake-up over a Unix socket (a synchronous one)
/// moves the woken task to the waker's CPU, where it preempts the waker or waits for it. This
/// 2-vCPU VM's kernel packs tasks onto few vCPUs besides: the init woken by its spec ran on
/// the supervisor's CPU and the supervisor, ready to run, waited 2.4 ms for it there while the
/// other CPU idled. Affinity is the one placement a scheduler keeps.
pub(crate) struct CpuSplit {
    all: nix::sched::CpuSet,
    here: usize,
}

impl CpuSplit {
    /// The split, when this process may run on more than one CPU.
    pub(crate) fn plan() -> Option<Self> {
        use nix::sched::{CpuSet, sched_getaffinity, sched_getcpu};
        let all = sched_getaffinity(Pid::from_raw(0)).ok()?;
        let here = sched_getcpu().ok()?;
        let allowed = (0..CpuSet::count()).filter(|&c| all.is_set(c).unwrap_or(false));
        if allowed.count() < 2 || !all.is_set(here).unwrap_or(false) {
            return None;
        }
        // Before the fork: the child's copy must know it too.
        *ALL_CPUS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(all);
        Some(Self { all, here })
    }

    /// The parent's side, right after the fork: pins this process to its CPU and `child` to
    /// the others (a child still waiting on our CPU moves at once). The child rejoins all of
    /// them itself (see [`rejoin`]), after its spec has come: after this call, then.
    pub(crate) fn apply(&self, child: Pid) {
        let Some((here, others)) = self.sets() else {
            return;
        };
        // Best effort: where it fails, the scheduler's own placement stands.
        if nix::sched::sched_setaffinity(child, &others).is_ok() {
            let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &here);
        }
    }

    /// The child's side, its first step: moves itself to the other CPUs. A new child may be
    /// run before its parent returns from the fork, on the parent's CPU; without this it kept
    /// that CPU for its own first steps (a millisecond and more) while the parent waited, in
    /// about half of the runs measured here.
    pub(crate) fn apply_child(&self) {
        if let Some((_, others)) = self.sets() {
            let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &others);
        }
    }

    /// (This CPU, the others).
    fn sets(&self) -> Option<(nix::sched::CpuSet, nix::sched::CpuSet)> {
        let mut here = nix::sched::CpuSet::new();
        let mut others = self.all;
        here.set(self.here).ok()?;
        others.unset(self.here).ok()?;
        Some((here, others))
    }
}

/// Undoes a [`CpuSplit`] for this process, each side when its part is done (the child before
/// it forks pid 1, which the program inherits every CPU from). Does nothing when there was no
/// split.
pub(crate) fn rejoin() {
    let all = ALL_CPUS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(all) = all {
        let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &all);
    }
}
