//! The session layer's part of `ampoule doctor`: which language kernels can start here.

use ampoule_runtime::doctor::{Check, Level};
use ampoule_types::Limits;

use crate::error::Error;
use crate::language;
use crate::setup::PythonEnv;

/// One line per language plug-in, plus one for the Python package environment.
pub fn checks() -> Vec<Check> {
    let mut out = Vec::new();
    for kernel in language::all() {
        let name = format!("session: {}", kernel.name());
        out.push(match kernel.locate(&Limits::default()) {
            Ok(spec) => Check {
                name,
                level: Level::Ok,
                detail: spec.note.unwrap_or_else(|| spec.argv.join(" ")),
                fix: None,
            },
            Err(Error::RuntimeMissing {
                looked_for, hint, ..
            }) => Check {
                name,
                level: Level::Warn,
                detail: format!("not installed (looked for {looked_for})"),
                fix: Some(hint),
            },
            Err(e) => Check {
                name,
                level: Level::Fail,
                detail: e.to_string(),
                fix: None,
            },
        });
    }
    let env = PythonEnv::default_location();
    out.push(match env.outdated() {
        Ok(outdated) if outdated.is_empty() => Check {
            name: "python packages".into(),
            level: Level::Ok,
            detail: format!(
                "{} matches kernels/python/requirements.txt",
                env.dir().display()
            ),
            fix: None,
        },
        Ok(outdated) => Check {
            name: "python packages".into(),
            level: Level::Warn,
            detail: format!(
                "{}: {} of the pinned packages are missing or differ",
                env.dir().display(),
                outdated.len()
            ),
            fix: Some("ampoule setup".into()),
        },
        Err(e) => Check {
            name: "python packages".into(),
            level: Level::Fail,
            detail: e.to_string(),
            fix: Some("ampoule setup".into()),
        },
    });
    if env.exists()
        && let Some(check) = zygote_sharing(&env)
    {
        out.push(check);
    }
    out
}

/// Whether a Python zygote's children share its objects' pages: only where its interpreter
/// has immortal objects (CPython 3.12+; `immortalize` in kernels/python/zygote.py). Older
/// ones write the reference count of every object a session touches, copying those pages.
fn zygote_sharing(env: &PythonEnv) -> Option<Check> {
    let (major, minor) = env.python_version()?;
    let name = "python zygote sharing".to_owned();
    Some(if (major, minor) >= (3, 12) {
        Check {
            name,
            level: Level::Ok,
            detail: format!(
                "CPython {major}.{minor}: a zygote makes its objects immortal, so its sessions \
                 share their pages instead of copying them"
            ),
            fix: None,
        }
    } else {
        Check {
            name,
            level: Level::Warn,
            detail: format!(
                "CPython {major}.{minor} writes the reference count of every object a session \
                 touches, so zygote-born sessions copy pages of their zygote that 3.12 would \
                 share (a pandas session after a first cell: 8.8 MiB against 4.5, \
                 docs/BENCHMARKS.md)"
            ),
            fix: Some(format!(
                "for denser pools, rebuild the environment with CPython 3.12 or newer: \
                 rm -rf {dir} && ampoule setup --python /path/to/python3.12",
                dir = env.dir().display()
            )),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_has_a_line_and_missing_ones_a_fix() {
        let checks = checks();
        for kernel in language::all() {
            let line = checks
                .iter()
                .find(|c| c.name == format!("session: {}", kernel.name()))
                .unwrap();
            if line.level != Level::Ok {
                assert!(line.fix.is_some(), "{line:?}");
            }
        }
        assert!(checks.iter().any(|c| c.name == "python packages"));
        for c in &checks {
            eprintln!("{:?} {} {} {:?}", c.level, c.name, c.detail, c.fix);
        }
    }

    #[test]
    fn zygote_sharing_follows_the_environment_interpreter() {
        let dir = std::env::temp_dir().join(format!("ampoule-doctor-{}", std::process::id()));
        let env = PythonEnv::at(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("pyvenv.cfg");
        std::fs::write(&cfg, "home = /usr/bin\nversion = 3.11.2\n").unwrap();
        let old = zygote_sharing(&env).unwrap();
        assert_eq!(old.level, Level::Warn, "{old:?}");
        assert!(old.fix.as_deref().unwrap().contains("--python"), "{old:?}");
        std::fs::write(&cfg, "home = /opt/py/bin\nversion_info = 3.13.0.final.0\n").unwrap();
        let new = zygote_sharing(&env).unwrap();
        assert_eq!(new.level, Level::Ok, "{new:?}");
        assert!(new.detail.contains("3.13"), "{new:?}");
        std::fs::write(&cfg, "home = /usr/bin\n").unwrap();
        assert!(zygote_sharing(&env).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
