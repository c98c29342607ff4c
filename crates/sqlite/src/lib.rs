//! The embedded store every sagamesh service keeps its state in: one SQLite
//! file in WAL mode, written by one thread that commits many writes at once.
//!
//! Why one writer thread: SQLite allows one writer per file anyway, and an
//! fsync costs about as much as a hundred small inserts. Callers queue
//! closures; the writer drains whatever is waiting, runs each inside its own
//! savepoint (a failing closure rolls back alone), commits once, and only then
//! answers every caller. So "the write returned Ok" always means "it is on
//! disk" (group commit), and many concurrent sagas share one fsync.
//!
//! Reads run on a second connection and thread, so they never wait behind a
//! commit (WAL readers see the last committed state).

use std::path::Path;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

/// How much a committed write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is fsynced: it survives the machine losing power.
    #[default]
    Machine,
    /// No fsync on commit: it survives the process dying, not the machine.
    Process,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the store is closed or could not run the write")]
    Closed,
    #[error("could not open the store at {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
}

/// Runs after the batch's commit, with its outcome.
type Completion = Box<dyn FnOnce(Result<(), &str>) + Send>;
/// A queued write: runs inside a savepoint, says whether to keep it, and
/// hands back what to do once the commit is known.
type WriteJob = Box<dyn FnOnce(&Connection) -> (bool, Completion) + Send>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// Most writes committed together; bounds the latency of a batch.
const MAX_BATCH: usize = 512;
/// Writes waiting for the writer. When full, callers wait (backpressure).
const WRITE_QUEUE: usize = 4096;
/// Reads waiting for the reader. When full, callers wait.
const READ_QUEUE: usize = 1024;

/// A handle to one SQLite file; cheap to clone.
#[derive(Clone)]
pub struct Store {
    writes: mpsc::Sender<WriteJob>,
    reads: mpsc::Sender<ReadJob>,
}

impl Store {
    /// Opens (or creates) the file, applies the migrations not yet applied
    /// (tracked in `PRAGMA user_version`) and starts the writer and reader.
    pub fn open(path: &Path, durability: Durability, migrations: &[&str]) -> Result<Store, StoreError> {
        let open = |path: &Path| {
            Connection::open(path).map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })
        };
        let writer = open(path)?;
        let synchronous = match durability {
            Durability::Machine => "FULL",
            Durability::Process => "NORMAL",
        };
        writer.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = {synchronous};
             PRAGMA busy_timeout = 5000;
             PRAGMA foreign_keys = ON;"
        ))?;
        migrate(&writer, migrations)?;
        let reader = open(path)?;
        reader.execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;")?;

        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (writes, write_rx) = mpsc::channel(WRITE_QUEUE);
        let (reads, read_rx) = mpsc::channel(READ_QUEUE);
        std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || run_writer(writer, write_rx))
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        std::thread::Builder::new()
            .name(format!("{name}-reader"))
            .spawn(move || run_reader(reader, read_rx))
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        Ok(Store { writes, reads })
    }

    /// Runs `f` in a write transaction shared with other callers. Returns
    /// once the transaction is durable. An `Err` from `f` rolls back only
    /// what `f` did.
    pub async fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&Connection) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: WriteJob = Box::new(move |conn| {
            let result = f(conn);
            let keep = result.is_ok();
            let complete: Completion = Box::new(move |commit| {
                let result = match (result, commit) {
                    (Ok(value), Ok(())) => Ok(value),
                    (Ok(_), Err(e)) => Err(E::from(StoreError::Commit(e.to_owned()))),
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(result);
            });
            (keep, complete)
        });
        self.writes
            .send(job)
            .await
            .map_err(|_| E::from(StoreError::Closed))?;
        rx.await.map_err(|_| E::from(StoreError::Closed))?
    }

    /// Runs `f` on the read connection, which sees the last commit.
    pub async fn read<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&Connection) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        self.reads
            .send(job)
            .await
            .map_err(|_| E::from(StoreError::Closed))?;
        rx.await.map_err(|_| E::from(StoreError::Closed))?
    }
}

fn migrate(conn: &Connection, migrations: &[&str]) -> Result<(), StoreError> {
    let applied: usize = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (version, sql) in migrations.iter().enumerate().skip(applied) {
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;",
            version + 1
        ))?;
    }
    Ok(())
}

fn run_writer(conn: Connection, mut jobs: mpsc::Receiver<WriteJob>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut completions: Vec<Completion> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let outcome = commit_batch(&conn, &mut batch, &mut completions);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, writes = completions.len(), "store commit failed");
            let _ = conn.execute_batch("ROLLBACK");
        }
        let outcome = outcome.as_ref().map(|_| ()).map_err(String::as_str);
        for complete in completions.drain(..) {
            complete(outcome);
        }
    }
}

/// Runs every job of the batch in one transaction, each in a savepoint.
fn commit_batch(
    conn: &Connection,
    batch: &mut Vec<WriteJob>,
    completions: &mut Vec<Completion>,
) -> Result<(), String> {
    let mut began = conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| e.to_string());
    for job in batch.drain(..) {
        // Once the transaction is broken, the rest of the batch is not run;
        // dropping a job answers its caller with `StoreError::Closed`.
        if began.is_err() {
            continue;
        }
        if let Err(e) = conn.execute_batch("SAVEPOINT job") {
            began = Err(e.to_string());
            continue;
        }
        // A panicking job must not take the writer down with it: its
        // savepoint is rolled back and its caller sees the write fail.
        let Ok((keep, complete)) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn)))
        else {
            tracing::error!("a store write panicked; rolled back");
            if let Err(e) = conn.execute_batch("ROLLBACK TO job; RELEASE job") {
                began = Err(e.to_string());
            }
            continue;
        };
        let end = if keep {
            "RELEASE job"
        } else {
            "ROLLBACK TO job; RELEASE job"
        };
        if let Err(e) = conn.execute_batch(end) {
            began = Err(e.to_string());
        }
        completions.push(complete);
    }
    began?;
    conn.execute_batch("COMMIT").map_err(|e| e.to_string())
}

fn run_reader(conn: Connection, mut jobs: mpsc::Receiver<ReadJob>) {
    while let Some(job) = jobs.blocking_recv() {
        job(&conn);
    }
}
