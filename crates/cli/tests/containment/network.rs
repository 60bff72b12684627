//! Network: loopback listeners of the host, abstract unix sockets, interfaces.

use crate::{Probe, expect_blocked, py};

pub(crate) fn probes() -> Vec<Probe> {
    vec![py(
        "network/only_loopback_interface",
        r#"
lines = open("/proc/net/dev").read().splitlines()[2:]
names = [l.split(":")[0].strip() for l in lines]
if names != ["lo"]:
    print("ESCAPED interfaces", names)
else:
    print("BLOCKED only", names)
"#,
        expect_blocked,
    )]
}
