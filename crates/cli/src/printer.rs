//! Everything `ampoule` itself says on stdout and stderr that is not a command's data. The
//! library crates print nothing: they hand what the operator must see to this module.

use std::io::Write;

use ampoule_server::serve::Notice;

/// Prints a notice of `ampoule serve`: the generated key on stdout (it is data the operator
/// must keep), everything else on stderr.
pub(crate) fn serve_notice(notice: Notice) {
    // A closed stdout or stderr must not bring the server down: what is lost is a message.
    let mut err = std::io::stderr().lock();
    let _ = match notice {
        Notice::GeneratedKey {
            key,
            tenant,
            digest_file,
        } => {
            let _ = writeln!(std::io::stdout().lock(), "{key}");
            writeln!(
                err,
                "ampoule: generated an API key for tenant {tenant:?} (printed above, shown only \
                 this once; its SHA-256 is in {})",
                digest_file.display()
            )
        }
        Notice::UsingGeneratedKey { digest_file } => writeln!(
            err,
            "ampoule: using the API key generated on first start (SHA-256 in {})",
            digest_file.display()
        ),
        Notice::Metrics { addr } => {
            writeln!(err, "ampoule: metrics on http://{addr}/metrics (no key)")
        }
        Notice::Listening {
            url,
            pools,
            default_pool,
        } => writeln!(
            err,
            "ampoule: listening on {url} (pools: {}; default: {default_pool})",
            pools.join(", ")
        ),
        Notice::ShuttingDown => writeln!(err, "ampoule: shutting down, closing every session"),
        other => writeln!(err, "ampoule: {other:?}"),
    };
}
