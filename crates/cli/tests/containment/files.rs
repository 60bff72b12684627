//! Files and secrets: host files, the server's environment, other sessions' files.

use crate::{Probe, expect_blocked, py};

pub(crate) fn probes() -> Vec<Probe> {
    vec![
        py(
            "files/read_etc_shadow",
            r#"
try:
    open("/etc/shadow").read()
    print("ESCAPED /etc/shadow readable")
except OSError as e:
    print("BLOCKED", e)
"#,
            expect_blocked,
        ),
        py(
            "files/server_environment",
            r#"
import os
leaked = [k for k, v in os.environ.items() if "CANARY" in v or k.startswith(("JAIL_", "AMPOULE_"))]
if leaked:
    print("ESCAPED", leaked)
else:
    print("BLOCKED environment is clean:", sorted(os.environ))
"#,
            expect_blocked,
        ),
    ]
}
