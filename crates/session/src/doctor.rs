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
    out
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
}
