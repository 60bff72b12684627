//! Kernel surface: denied syscalls, /proc/sys, /sys, devices.

use crate::{Probe, expect_blocked, py};

pub(crate) fn probes() -> Vec<Probe> {
    vec![py(
        "kernel/unshare_user_namespace",
        r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
if libc.unshare(CLONE_NEWUSER) == 0:
    print("ESCAPED unshare(CLONE_NEWUSER) succeeded")
else:
    print("BLOCKED unshare:", os.strerror(ctypes.get_errno()))
"#,
        expect_blocked,
    )]
}
