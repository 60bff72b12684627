//! Privilege: capabilities, setuid, nested namespaces, mount, chroot, setns, ptrace.

use crate::{Probe, expect_blocked, py};

pub(crate) fn probes() -> Vec<Probe> {
    vec![py(
        "privilege/no_capabilities",
        r#"
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
caps = {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
if any(int(v, 16) for v in caps.values()):
    print("ESCAPED capabilities", caps)
else:
    print("BLOCKED no capabilities", caps)
"#,
        expect_blocked,
    )]
}
