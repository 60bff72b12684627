//! Image names (`NAME[:TAG]`, as pools and `ls` say them) and registry references
//! (`HOST[:PORT]/REPO[:TAG|@DIGEST]`).

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// A local image name with its tag (`latest` when none was given).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageName {
    /// The repository part: lowercase, digits, `._-/`, and a `host:port/` prefix.
    pub repo: String,
    /// The tag.
    pub tag: String,
}

fn split_tag(s: &str) -> (&str, Option<&str>) {
    let slash = s.rfind('/').map_or(0, |i| i + 1);
    match s[slash..].rfind(':') {
        Some(i) => (&s[..slash + i], Some(&s[slash + i + 1..])),
        None => (s, None),
    }
}

fn check_repo(value: &str, repo: &str, what: &'static str) -> Result<()> {
    let invalid = |why| Error::Invalid {
        what,
        value: value.to_owned(),
        why,
    };
    if repo.is_empty() || repo.len() > 255 {
        return Err(invalid("the name must have 1 to 255 characters"));
    }
    for (i, part) in repo.split('/').enumerate() {
        let host_ok = i == 0
            && repo.contains('/')
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
            && part.starts_with(|c: char| c.is_ascii_alphanumeric())
            && (part.contains(['.', ':']) || part == "localhost");
        let ok = !part.is_empty()
            && part
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
            && !part.starts_with(['.', '-', '_'])
            && part != "..";
        if !ok && !host_ok {
            return Err(invalid(
                "use lowercase letters, digits, '.', '_', '-' and '/' (a registry host may come first)",
            ));
        }
    }
    Ok(())
}

fn check_tag(value: &str, tag: &str, what: &'static str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !tag.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what,
            value: value.to_owned(),
            why: "a tag has 1 to 128 of letters, digits, '_', '.', '-'",
        })
    }
}

impl ImageName {
    /// Parses `NAME[:TAG]`.
    pub fn parse(s: &str) -> Result<Self> {
        let (repo, tag) = split_tag(s);
        let tag = tag.unwrap_or("latest");
        check_repo(s, repo, "image name")?;
        check_tag(s, tag, "image name")?;
        Ok(Self {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repo, self.tag)
    }
}

/// What a registry reference points at in its repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A tag.
    Tag(String),
    /// A manifest digest.
    Digest(Digest),
}

/// `HOST[:PORT]/REPO[:TAG|@DIGEST]`: where to pull from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// The repository path in the registry.
    pub repo: String,
    /// Tag or digest.
    pub target: Target,
}

impl Reference {
    /// Parses a reference. The registry host is required (there is no default registry).
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |why| Error::Invalid {
            what: "reference",
            value: s.to_owned(),
            why,
        };
        let (rest, target) = match s.split_once('@') {
            Some((r, d)) => (r, Target::Digest(d.parse()?)),
            None => match split_tag(s) {
                (r, Some(t)) => {
                    check_tag(s, t, "reference")?;
                    (r, Target::Tag(t.to_owned()))
                }
                (r, None) => (r, Target::Tag("latest".into())),
            },
        };
        let (registry, repo) = rest
            .split_once('/')
            .ok_or_else(|| invalid("name the registry: HOST[:PORT]/REPO[:TAG]"))?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(invalid(
                "the part before the first '/' must be a registry host",
            ));
        }
        check_repo(s, &format!("{registry}/{repo}"), "reference")?;
        Ok(Self {
            registry: registry.to_owned(),
            repo: repo.to_owned(),
            target,
        })
    }

    /// The local name a pulled image gets by default: the reference itself (a digest
    /// reference is named after the first 12 hex digits of the digest).
    pub fn local_name(&self) -> ImageName {
        ImageName {
            repo: format!("{}/{}", self.registry, self.repo),
            tag: match &self.target {
                Target::Tag(t) => t.clone(),
                Target::Digest(d) => d.short().to_owned(),
            },
        }
    }

    /// The tag or digest as the registry's URL path wants it.
    pub fn target_str(&self) -> String {
        match &self.target {
            Target::Tag(t) => t.clone(),
            Target::Digest(d) => d.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_references() {
        let n = ImageName::parse("my-python:1.0").ok();
        assert_eq!(n.map(|n| n.to_string()), Some("my-python:1.0".into()));
        assert_eq!(
            ImageName::parse("base").ok().map(|n| n.to_string()),
            Some("base:latest".into())
        );
        assert_eq!(
            ImageName::parse("127.0.0.1:5000/team/py:3")
                .ok()
                .map(|n| n.tag),
            Some("3".into())
        );
        for bad in [
            "", "UPPER", "../x", "a/../b", "a:", "a:-x", "a b", ".hidden",
        ] {
            assert!(ImageName::parse(bad).is_err(), "{bad}");
        }
        let r = Reference::parse("127.0.0.1:5000/team/py:1.0").ok();
        assert_eq!(
            r,
            Some(Reference {
                registry: "127.0.0.1:5000".into(),
                repo: "team/py".into(),
                target: Target::Tag("1.0".into()),
            })
        );
        assert!(Reference::parse("python:3").is_err());
        assert!(Reference::parse("localhost/x@sha256:00").is_err());
    }
}
