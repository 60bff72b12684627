//! Processes: seeing or signalling host processes, daemons that outlive the run.

use crate::{Probe, expect_blocked, py};

pub(crate) fn probes() -> Vec<Probe> {
    vec![py(
        "processes/only_own_pids_visible",
        r#"
import os
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
if any(p > 64 for p in pids) or 1 not in pids:
    print("ESCAPED host pids visible:", pids)
else:
    print("BLOCKED sandbox sees only", pids)
"#,
        expect_blocked,
    )]
}
