//! Errors of the audit store.

/// Why the audit store could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or failed.
    #[error("audit database")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("audit database migration")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored record is not valid JSON.
    #[error("audit record {seq} is not readable")]
    Corrupt {
        /// The record's sequence number.
        seq: i64,
    },
    /// The URL names no supported database.
    #[error("unsupported audit store url (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    /// The writer task has stopped.
    #[error("the audit writer has stopped")]
    WriterGone,
}
