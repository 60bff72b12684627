//! PowerShell: `pwsh` (PowerShell 7), where it is installed, driven by a small Python program.
//!
//! Debian does not package PowerShell; on hosts without it this plug-in only says what to
//! install.

use ampoule_types::{Language, Limits};

use super::{
    KERNELIO, Kernel, KernelFile, LanguageSpec, base_python, binds_for, find_executable,
    in_sandbox, string,
};
use crate::error::Result;

const DRIVER: KernelFile = KernelFile {
    name: "kernel.py",
    contents: include_str!("../../../../kernels/powershell/kernel.py"),
};
const LOOP: KernelFile = KernelFile {
    name: "loop.ps1",
    contents: include_str!("../../../../kernels/powershell/loop.ps1"),
};

/// The PowerShell plug-in (`kernels/powershell/`).
#[derive(Debug, Clone, Copy)]
pub struct PowerShell;

impl Kernel for PowerShell {
    fn language(&self) -> Language {
        Language::Powershell
    }

    fn locate(&self, _limits: &Limits) -> Result<LanguageSpec> {
        let pwsh = find_executable(
            "powershell",
            &[
                "/usr/bin/pwsh",
                "/usr/local/bin/pwsh",
                "/opt/microsoft/powershell/7/pwsh",
            ],
            "install PowerShell 7 (the `powershell` package from Microsoft's Debian repository; Debian itself does not ship it)",
        )?;
        let python = base_python("powershell")?;
        let mut ro_binds = binds_for(&python);
        ro_binds.extend(binds_for(&pwsh));
        Ok(LanguageSpec {
            language: "powershell",
            argv: vec![string(&python), in_sandbox(DRIVER.name)],
            env: vec![
                ("AMPOULE_PWSH".into(), string(&pwsh)),
                ("POWERSHELL_TELEMETRY_OPTOUT".into(), "1".into()),
                ("POWERSHELL_UPDATECHECK".into(), "Off".into()),
                ("DOTNET_CLI_TELEMETRY_OPTOUT".into(), "1".into()),
                ("XDG_CONFIG_HOME".into(), "/tmp/.config".into()),
                ("XDG_DATA_HOME".into(), "/tmp/.local/share".into()),
                ("XDG_CACHE_HOME".into(), "/tmp/.cache".into()),
            ],
            ro_binds,
            files: vec![DRIVER, KERNELIO, LOOP],
            image_root: None,
            isolation: ampoule_runtime::Isolation::Namespaces,
            writable_root: false,
            note: Some(format!(
                "{} (driven by {})",
                pwsh.display(),
                python.display()
            )),
        })
    }
}
