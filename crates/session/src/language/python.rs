//! Python: the host's CPython 3, inside the environment `ampoule setup` builds when it exists.

use ampoule_types::{Language, Limits};

use super::{
    KERNELIO, Kernel, KernelFile, LanguageSpec, base_python, binds_for, in_sandbox, string,
};
use crate::error::Result;
use crate::setup::PythonEnv;

pub(crate) const KERNEL: KernelFile = KernelFile {
    name: "kernel.py",
    contents: include_str!("../../../../kernels/python/kernel.py"),
};

/// The Python plug-in (`kernels/python/kernel.py`).
#[derive(Debug, Clone, Copy)]
pub struct Python;

impl Kernel for Python {
    fn language(&self) -> Language {
        Language::Python
    }

    fn locate(&self, _limits: &Limits) -> Result<LanguageSpec> {
        let env = PythonEnv::default_location();
        let (python, note) = if env.exists() {
            (
                env.python(),
                format!(
                    "{} (the `ampoule setup` environment)",
                    env.python().display()
                ),
            )
        } else {
            {
                let python = base_python("python")?;
                let note = format!(
                    "{} without packages: run `ampoule setup` for numpy, pandas, matplotlib…",
                    python.display()
                );
                (python, note)
            }
        };
        let bin_dir = python.parent().map(string).unwrap_or_default();
        Ok(LanguageSpec {
            language: "python",
            argv: vec![string(&python), in_sandbox(KERNEL.name)],
            env: vec![
                (
                    "PATH".into(),
                    format!("{bin_dir}:/usr/local/bin:/usr/bin:/bin"),
                ),
                ("PYTHONUNBUFFERED".into(), "1".into()),
                ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
                ("MPLBACKEND".into(), "Agg".into()),
                // Caches and configs go to /tmp, never into the user's /mnt/data.
                ("MPLCONFIGDIR".into(), "/tmp/.config/matplotlib".into()),
                ("XDG_CACHE_HOME".into(), "/tmp/.cache".into()),
            ],
            ro_binds: binds_for(&python),
            files: vec![KERNEL, KERNELIO],
            image_root: None,
            isolation: ampoule_runtime::Isolation::Namespaces,
            writable_root: false,
            note: Some(note),
        })
    }
}
