//! The write path: a bounded channel in front of one task that appends records in batches,
//! one transaction per batch, so an execution never waits for the database.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::{AuditStore, Error, Record};

/// Most records appended in one transaction.
const BATCH: usize = 512;

/// How long the writer waits for more records before it writes a batch.
const LINGER: Duration = Duration::from_millis(10);

enum Msg {
    Record(Box<Record>),
    Flush(oneshot::Sender<()>),
}

/// The sending side of the audit writer (cheap to clone). The task ends, after writing what
/// it was sent, when every clone is dropped.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Writer {
    /// Starts the writer task over `store`, with room for `capacity` records in flight.
    /// Must be called from within a tokio runtime.
    pub fn spawn(
        store: Arc<dyn AuditStore>,
        capacity: usize,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let task = tokio::spawn(run(store, rx));
        (Writer { tx }, task)
    }

    /// Queues a record. Waits only when the channel is full (back-pressure rather than loss:
    /// an audit log that silently drops records answers nothing).
    pub async fn write(&self, record: Record) -> Result<(), Error> {
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                self.tx.send(msg).await.map_err(|_| Error::WriterGone)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::WriterGone),
        }
    }

    /// Waits until every record queued before this call is in the store.
    pub async fn flush(&self) -> Result<(), Error> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Flush(done))
            .await
            .map_err(|_| Error::WriterGone)?;
        wait.await.map_err(|_| Error::WriterGone)
    }
}

async fn run(store: Arc<dyn AuditStore>, mut rx: mpsc::Receiver<Msg>) {
    let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => batch.push(*r),
                Msg::Flush(done) => flushes.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        // Nothing more queued: wait a little for more before writing, unless a flush waits.
        // Every transaction costs the same few round trips to the database (and on SQLite
        // as many hops to its worker thread) whatever it holds, and that work competes with
        // the next executions for the CPUs. Records reach the store at most LINGER later.
        // It sleeps rather than waits on the channel: a record sent meanwhile is only queued.
        // Waking this task for each one would, in the middle of the execution that sent it,
        // hand the task to another worker thread (a futex wake and an idle CPU woken).
        if flushes.is_empty() && batch.len() < BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(Msg::Record(r)) => batch.push(*r),
                    Ok(Msg::Flush(done)) => {
                        flushes.push(done);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        if !batch.is_empty() {
            append_with_retry(store.as_ref(), &batch).await;
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn append_with_retry(store: &dyn AuditStore, batch: &[Record]) {
    let mut wait = Duration::from_millis(50);
    for attempt in 1..=5 {
        match store.append(batch).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, attempt, records = batch.len(), "audit append failed");
                tokio::time::sleep(wait).await;
                wait *= 4;
            }
        }
    }
    tracing::error!(records = batch.len(), "audit records lost after retries");
}
