//! JavaScript: Node.js, evaluated through the V8 inspector's REPL mode.

use ampoule_types::{Language, Limits};

use super::{Kernel, KernelFile, LanguageSpec, binds_for, find_executable, in_sandbox, string};
use crate::error::Result;

pub(super) const LAUNCH: KernelFile = KernelFile {
    name: "launch.sh",
    contents: include_str!("../../../../kernels/javascript/launch.sh"),
};
pub(super) const KERNEL: KernelFile = KernelFile {
    name: "kernel.js",
    contents: include_str!("../../../../kernels/javascript/kernel.js"),
};

/// V8 sizes its heap from the host's memory; keep it inside the sandbox's limit so a big
/// allocation is a JavaScript error, not the cgroup's OOM killer.
pub(super) fn heap_mib(limits: &Limits) -> u64 {
    (limits.memory_mib * 3 / 4).max(64)
}

/// The JavaScript plug-in (`kernels/javascript/`).
#[derive(Debug, Clone, Copy)]
pub struct JavaScript;

impl Kernel for JavaScript {
    fn language(&self) -> Language {
        Language::Javascript
    }

    fn locate(&self, limits: &Limits) -> Result<LanguageSpec> {
        let node = find_executable(
            "javascript",
            &["/usr/bin/node", "/usr/local/bin/node", "/usr/bin/nodejs"],
            "apt-get install nodejs",
        )?;
        let bash = find_executable(
            "javascript",
            &["/usr/bin/bash", "/bin/bash"],
            "apt-get install bash",
        )?;
        let heap_mib = heap_mib(limits);
        Ok(LanguageSpec {
            language: "javascript",
            argv: vec![
                string(&bash),
                in_sandbox(LAUNCH.name),
                string(&node),
                in_sandbox(KERNEL.name),
                format!("--max-old-space-size={heap_mib}"),
            ],
            env: Vec::new(),
            ro_binds: binds_for(&node),
            files: vec![LAUNCH, KERNEL],
            image_root: None,
            isolation: ampoule_runtime::Isolation::Namespaces,
            writable_root: false,
            note: Some(format!("{} (V8 inspector REPL mode)", node.display())),
        })
    }
}
