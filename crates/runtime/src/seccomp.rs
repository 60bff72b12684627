//! The seccomp policy: compiled at build time (`build.rs`) from the reviewable JSON in
//! `policies/seccomp/default.json`, by `crate::bpf` into a binary search on the syscall number
//! (~150 instructions where seccompiler's linear chain has ~1,550; the tests below check both
//! return the same action for every input they try).
//!
//! Three programs are installed, in this order (the kernel evaluates the most recently
//! installed filter first and, among equal actions, keeps its value):
//! 1. a hand-assembled guard that kills the process on the x32 ABI (`nr >= 0x40000000`);
//!    the filters' prologue already kills any foreign audit arch (the i386 `int 0x80` entry),
//!    but the policy language matches syscall numbers exactly and cannot express a range;
//! 2. `sandbox`: the allowlist, default `EPERM`;
//! 3. `sandbox_enosys`: `clone3` answers `ENOSYS`, so libc falls back to `clone`, whose flags
//!    the allowlist can inspect (a `clone3` argument lives in memory, out of BPF's reach).

use seccompiler::{BpfProgram, TargetArch, sock_filter};

use crate::error::{Error, Result};

/// The default policy, embedded at build time so the binary never reads policy from disk at run
/// time.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/seccomp/default.json");

/// [`DEFAULT_POLICY`] compiled by `build.rs` for the target architecture (compact programs, or
/// seccompiler's where the compact compiler declined): every sandbox start installs these
/// instead of compiling the JSON again (`None` on an architecture seccompiler does not know,
/// where [`SeccompPolicy::default_policy`] falls back to compiling, and fails).
mod compiled {
    use seccompiler::sock_filter;
    include!(concat!(env!("OUT_DIR"), "/seccomp_default.rs"));
}

/// The compiled filters, ready to install.
#[derive(Debug, Clone)]
pub struct SeccompPolicy {
    programs: Vec<BpfProgram>,
}

const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Classic BPF opcodes (linux/bpf_common.h); seccompiler does not export its builders.
/// BPF_LD | BPF_W | BPF_ABS (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;

impl SeccompPolicy {
    /// The default policy for this machine's architecture, as `build.rs` compiled it.
    pub fn default_policy() -> Result<Self> {
        let Some(main) = compiled::SANDBOX else {
            return Self::compile(DEFAULT_POLICY);
        };
        let mut programs = Vec::with_capacity(3);
        if cfg!(target_arch = "x86_64") {
            programs.push(x32_guard());
        }
        programs.push(main.to_vec());
        if let Some(enosys) = compiled::SANDBOX_ENOSYS {
            programs.push(enosys.to_vec());
        }
        Ok(Self { programs })
    }

    /// Compiles a policy in seccompiler's JSON format with seccompiler (linear programs); it
    /// must define `sandbox` and may define `sandbox_enosys`.
    pub fn compile(json: &str) -> Result<Self> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| Error::Seccomp(format!("unsupported architecture: {e}")))?;
        let mut map = seccompiler::compile_from_json(json.as_bytes(), arch)
            .map_err(|e| Error::Seccomp(e.to_string()))?;
        let main = map
            .remove("sandbox")
            .ok_or_else(|| Error::Seccomp("policy has no \"sandbox\" filter".into()))?;
        let mut programs = Vec::with_capacity(3);
        if matches!(arch, TargetArch::x86_64) {
            programs.push(x32_guard());
        }
        programs.push(main);
        if let Some(enosys) = map.remove("sandbox_enosys") {
            programs.push(enosys);
        }
        Ok(Self { programs })
    }

    /// Installs every filter on the calling thread. `no_new_privs` must already be set.
    pub(crate) fn apply(&self) -> Result<()> {
        for prog in &self.programs {
            crate::sys::apply_seccomp(prog).map_err(|e| Error::Seccomp(e.to_string()))?;
        }
        Ok(())
    }

    /// The programs, in installation order, as `(code, jt, jf, k)` instructions: what a zygote
    /// child installs itself (see `crate::zygote`).
    pub(crate) fn raw_programs(&self) -> Vec<Vec<(u16, u8, u8, u32)>> {
        self.programs
            .iter()
            .map(|p| p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect())
            .collect()
    }

    /// Number of BPF instructions across all programs (reported by `doctor`).
    pub fn instructions(&self) -> usize {
        self.programs.iter().map(Vec::len).sum()
    }
}

fn x32_guard() -> BpfProgram {
    vec![
        // A = seccomp_data.nr (offset 0)
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        // if A >= X32_SYSCALL_BIT → kill, else allow (later filters still apply)
        sock_filter {
            code: BPF_JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_KILL_PROCESS,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::Arch;
    use crate::bpf::Insn;
    use crate::bpf::testing::assert_same_actions;

    fn insns(prog: &[(u16, u8, u8, u32)]) -> Vec<Insn> {
        prog.iter()
            .map(|&(code, jt, jf, k)| Insn { code, jt, jf, k })
            .collect()
    }

    /// The programs `build.rs` embedded return what seccompiler makes of the JSON now (never a
    /// stale or wrong copy), program by program: the x32 guard, the allowlist and the clone3
    /// filter. For each `nr` below 1024, x32's and the extremes, on this architecture and four
    /// wrong ones, with all-zero and all-one arguments, and where a program reads arguments:
    /// every value the policy compares an argument with (±1, with its high half set or
    /// flipped, complemented; each mask and its complements; 0, `u32::MAX`, `u64::MAX`…) in
    /// all six, every combination of those values over the arguments read, each rule's
    /// satisfying vector with one argument changed to each value, and random vectors.
    #[test]
    fn the_embedded_programs_act_as_seccompilers_compilation_of_the_json() {
        let embedded = SeccompPolicy::default_policy().unwrap().raw_programs();
        let fresh = SeccompPolicy::compile(DEFAULT_POLICY)
            .unwrap()
            .raw_programs();
        assert_eq!(embedded.len(), fresh.len());
        assert!(compiled::SANDBOX.is_some() && compiled::SANDBOX_ENOSYS.is_some());
        let audit = Arch::from_target(std::env::consts::ARCH).unwrap().audit();
        for (a, b) in embedded.iter().zip(&fresh) {
            let n = assert_same_actions(&insns(a), &insns(b), audit, DEFAULT_POLICY, &|_| None);
            println!(
                "{} instructions against seccompiler's {}: {n} inputs, same actions",
                a.len(),
                b.len()
            );
        }
    }

    /// The allowlist is the compact program, not seccompiler's linear chain (which `build.rs`
    /// embeds only when the compact compiler declines the policy, with a warning).
    #[test]
    fn the_embedded_allowlist_is_compact() {
        let compact = compiled::SANDBOX.unwrap().len();
        let linear = SeccompPolicy::compile(DEFAULT_POLICY).unwrap().programs[1].len();
        println!("sandbox filter: {compact} instructions (seccompiler: {linear})");
        assert!(compact < 400, "{compact} instructions");
        assert!(compact * 4 < linear, "{compact} against {linear}");
    }

    #[test]
    fn default_policy_compiles() {
        let p = SeccompPolicy::default_policy().unwrap();
        assert_eq!(p.programs.len(), 3);
        assert!(p.instructions() > 50, "{}", p.instructions());
    }

    #[test]
    fn dangerous_syscalls_are_not_in_the_allowlist() {
        let v: serde_json::Value = serde_json::from_str(DEFAULT_POLICY).unwrap();
        let allowed: Vec<&str> = v["sandbox"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["syscall"].as_str().unwrap())
            .collect();
        for denied in [
            "mount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "settimeofday",
            "clock_settime",
            "adjtimex",
            "clock_adjtime",
            "swapon",
            "swapoff",
            "chroot",
            "open_by_handle_at",
            "name_to_handle_at",
            "fsopen",
            "fsmount",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "syslog",
            "acct",
            "quotactl",
            "sethostname",
            "setdomainname",
            "clone3",
        ] {
            assert!(!allowed.contains(&denied), "{denied} must not be allowed");
        }
        // socket and clone are only allowed with argument conditions
        for conditional in ["socket", "socketpair", "clone", "ioctl", "personality"] {
            let rules: Vec<_> = v["sandbox"]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["syscall"] == conditional)
                .collect();
            assert!(!rules.is_empty());
            assert!(
                rules.iter().all(|r| r.get("args").is_some()),
                "{conditional} must always carry conditions"
            );
        }
    }

    #[test]
    fn a_policy_without_the_sandbox_filter_is_refused() {
        let err = SeccompPolicy::compile(
            r#"{"other": {"default_action": "allow", "filter_action": {"errno": 1}, "filter": []}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("sandbox"), "{err}");
    }
}
