//! Shell: one long-lived GNU bash, driven by a small Python program.

use ampoule_types::{Language, Limits};

use super::{
    KERNELIO, Kernel, KernelFile, LanguageSpec, base_python, binds_for, find_executable,
    in_sandbox, string,
};
use crate::error::Result;

pub(super) const KERNEL: KernelFile = KernelFile {
    name: "kernel.py",
    contents: include_str!("../../../../kernels/shell/kernel.py"),
};

/// The shell plug-in (`kernels/shell/kernel.py`).
#[derive(Debug, Clone, Copy)]
pub struct Shell;

impl Kernel for Shell {
    fn language(&self) -> Language {
        Language::Shell
    }

    fn locate(&self, _limits: &Limits) -> Result<LanguageSpec> {
        let bash = find_executable(
            "shell",
            &["/usr/bin/bash", "/bin/bash"],
            "apt-get install bash",
        )?;
        let python = base_python("shell")?;
        let mut ro_binds = binds_for(&python);
        ro_binds.extend(binds_for(&bash));
        Ok(LanguageSpec {
            language: "shell",
            argv: vec![string(&python), in_sandbox(KERNEL.name)],
            env: vec![("AMPOULE_BASH".into(), string(&bash))],
            ro_binds,
            files: vec![KERNEL, KERNELIO],
            image_root: None,
            isolation: ampoule_runtime::Isolation::Namespaces,
            writable_root: false,
            note: Some(format!(
                "{} (driven by {})",
                bash.display(),
                python.display()
            )),
        })
    }
}
