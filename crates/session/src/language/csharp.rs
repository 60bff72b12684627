//! C#: Mono's C# evaluator (the engine of its `csharp` REPL), driven by a small Python program.

use std::path::Path;

use ampoule_types::{Language, Limits};

use super::{
    KERNELIO, Kernel, KernelFile, LanguageSpec, base_python, binds_for, find_executable,
    in_sandbox, string,
};
use crate::error::{Error, Result};

const DRIVER: KernelFile = KernelFile {
    name: "kernel.py",
    contents: include_str!("../../../../kernels/csharp/kernel.py"),
};
const EVALUATOR: KernelFile = KernelFile {
    name: "evaluator.cs",
    contents: include_str!("../../../../kernels/csharp/evaluator.cs"),
};

const HINT: &str = "apt-get install mono-complete";
const MONO_CSHARP: &str = "/usr/lib/mono/4.5/Mono.CSharp.dll";
const MONO_ETC: &str = "/etc/mono";

/// The C# plug-in (`kernels/csharp/`).
#[derive(Debug, Clone, Copy)]
pub struct CSharp;

impl Kernel for CSharp {
    fn language(&self) -> Language {
        Language::Csharp
    }

    fn locate(&self, _limits: &Limits) -> Result<LanguageSpec> {
        let mono = find_executable("csharp", &["/usr/bin/mono", "/usr/local/bin/mono"], HINT)?;
        let mcs = find_executable("csharp", &["/usr/bin/mcs", "/usr/local/bin/mcs"], HINT)?;
        if !Path::new(MONO_CSHARP).is_file() {
            return Err(Error::RuntimeMissing {
                language: "csharp",
                looked_for: MONO_CSHARP.into(),
                hint: HINT.into(),
            });
        }
        let python = base_python("csharp")?;
        let mut ro_binds = binds_for(&python);
        ro_binds.extend(binds_for(&mono));
        // Mono's dllmap (System.Native → libmono-native.so) and machine.config live in
        // /etc/mono, which the sandbox's generated /etc does not carry.
        if Path::new(MONO_ETC).is_dir() {
            ro_binds.push(MONO_ETC.into());
        }
        Ok(LanguageSpec {
            language: "csharp",
            argv: vec![string(&python), in_sandbox(DRIVER.name)],
            env: vec![
                ("AMPOULE_MONO".into(), string(&mono)),
                ("AMPOULE_MCS".into(), string(&mcs)),
                ("AMPOULE_MONO_CSHARP".into(), MONO_CSHARP.into()),
                // Mono keeps per-user state under ~/.mono; keep it out of /mnt/data.
                ("MONO_REGISTRY_PATH".into(), "/tmp/.mono/registry".into()),
                ("XDG_CONFIG_HOME".into(), "/tmp/.config".into()),
            ],
            ro_binds,
            files: vec![DRIVER, KERNELIO, EVALUATOR],
            image_root: None,
            isolation: ampoule_runtime::Isolation::Namespaces,
            writable_root: false,
            note: Some(format!(
                "{} with Mono's C# evaluator (driven by {})",
                mono.display(),
                python.display()
            )),
        })
    }
}
