//! Resources: every limit stops the program, says which limit, and leaves nothing behind.

use ampoule_types::LimitKind;

use crate::{Probe, expect_limit, py};

pub(crate) fn probes() -> Vec<Probe> {
    vec![
        py(
            "resources/memory_bomb",
            "x = bytearray(1024 * 1024 * 1024)\nprint('ESCAPED allocated 1 GiB')\n",
            |o| expect_limit(o, LimitKind::Memory),
        )
        .args(&["--memory", "128"]),
        py(
            "resources/cpu_spin_timeout",
            "print('spinning', flush=True)\nwhile True:\n    pass\n",
            |o| {
                expect_limit(o, LimitKind::Time)?;
                // Output produced before the kill is kept.
                if !o.result.stdout.contains("spinning") {
                    return Err("output before the timeout was lost".into());
                }
                Ok(())
            },
        )
        .args(&["--timeout", "1"]),
        py(
            "resources/fork_bomb",
            "import os\nwhile True:\n    os.fork()\n",
            |o| expect_limit(o, LimitKind::Pids),
        )
        .args(&["--pids", "32", "--timeout", "20"]),
        py(
            "resources/disk_fill",
            "with open('/mnt/data/fill', 'wb') as f:\n    while True:\n        f.write(b'x' * 1048576)\n",
            |o| expect_limit(o, LimitKind::Disk),
        )
        .args(&["--disk", "16"]),
        py(
            "resources/output_flood",
            "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n",
            |o| {
                expect_limit(o, LimitKind::Output)?;
                if !o.result.stdout_truncated || o.result.stdout.len() != 100_000 {
                    return Err(format!(
                        "stdout not cut at the cap: {} bytes, truncated={}",
                        o.result.stdout.len(),
                        o.result.stdout_truncated
                    ));
                }
                Ok(())
            },
        )
        .args(&["--output-bytes", "100000"]),
    ]
}
