//! Where ampoule keeps its data on the host, decided in one place.
//!
//! The data directory is `$AMPOULE_DATA_DIR` when set, else `/var/lib/ampoule` for root and
//! `$XDG_DATA_HOME/ampoule` (default `~/.local/share/ampoule`) for anyone else. The Python
//! environment that sessions use lives in its `python` sub-directory. Sandboxes bind it
//! read-only, so everything in it must be world-readable.

use std::path::PathBuf;

/// The data directory (see the module docs).
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AMPOULE_DATA_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/ampoule");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("ampoule");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/share/ampoule")
}

/// The virtual environment `ampoule setup` builds and Python sessions run in.
pub fn python_env_dir() -> PathBuf {
    data_dir().join("python")
}
