//! The SQLite engine: one file in WAL mode, written by one thread that
//! commits many writes at once, read on pooled connections.
//!
//! Why one writer thread: SQLite allows one writer per file anyway, and an
//! fsync costs about as much as a hundred small inserts. Callers queue
//! closures; the writer drains whatever is waiting, runs them all in one
//! transaction (a failing closure rolls back alone, see
//! [`commit_batch`]), commits once, and only then answers every caller. So
//! "the write returned Ok" always means "it is on disk" (group commit), and
//! many concurrent sagas share one fsync.
//!
//! Reads run on their own connections, so they never wait behind a commit
//! (WAL readers see the last committed state). They run right on the
//! caller's thread: a read takes microseconds, far less than handing it to
//! another thread and waking the caller again would cost. The process
//! holds the file exclusively (the `unix-excl` VFS, see
//! [`open_connection`]), so its connections lock each other in memory,
//! without a system call.
//!
//! A commit and its fsync are two steps here: SQLite commits with
//! `synchronous = NORMAL` (no fsync) and the WAL file is then synced by
//! hand, so a staged write can be answered in between. When more writes
//! are already waiting, a syncer thread does the fsync and the writer goes
//! on committing meanwhile; one fsync then covers every commit made before
//! it started, so a slow disk makes batches wait for the next fsync instead
//! of leaving the writer idle. When nothing is waiting, the writer syncs
//! itself and saves the hand-off. Readers therefore may see a commit before
//! its fsync; a read whose rows are passed on waits for it (`synced`).
//!
//! A deferred write ([`SyncWhen::Deferred`]) does not ask for an
//! fsync of its own: its batch waits at the syncer for the next write that
//! does, for a read that must see it durable, or for [`DEFER_SYNC_AT_MOST`],
//! whichever comes first. A stream of deferred writes between durable ones
//! thus shares their fsyncs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use crate::prepared::Prepared;
use crate::sched;
use crate::synced::{self, Marker, Watermark};
use crate::{Durability, StoreError, Synced, settle};

/// Runs after the batch's commit (or its sync), with the outcome.
type Completion = Box<dyn FnOnce(Result<(), &str>) + Send>;

/// A queued write. The writer runs it in the batch's transaction, and may
/// run it again when a later job of the batch fails after writing (see
/// [`commit_batch`]); only the last run counts.
trait WriteJob: Send {
    /// Runs the write's statements; says whether to keep them.
    fn run(&mut self, conn: &mut Prepared<'_>) -> bool;
    /// What to do once the commit is known, with the last run's result.
    fn finish(self: Box<Self>) -> Finish;
}

/// What the writer does for a job once its batch committed, or failed to.
struct Finish {
    /// Whether its batch must be synced now, or may wait (deferred).
    urgent: bool,
    /// Called once the batch is committed (visible, not yet synced).
    committed: Option<Completion>,
    /// Called once the batch is synced (durable as the store promises).
    synced: Completion,
}

/// A caller's write and where its answer goes.
struct Queued<F, R, E> {
    f: F,
    /// The last run's result; `None` before the first run and after a
    /// run that panicked.
    result: Option<Result<R, E>>,
    answer: Answer<R, E>,
}

enum Answer<R, E> {
    /// [`SqliteStore::write`]: answered once synced.
    Durable(oneshot::Sender<Result<R, E>>),
    /// [`SqliteStore::write_staged`]: answered once committed, with a
    /// [`Synced`] that resolves once synced.
    Staged(oneshot::Sender<Result<(R, Synced), E>>, SyncWhen),
}

/// When a staged write's commit is synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SyncWhen {
    /// At once, as for a durable write.
    Now,
    /// With a later write's sync, a durable read's, or after
    /// [`DEFER_SYNC_AT_MOST`]: the write asks for no fsync of its own.
    Deferred,
}

impl<F, R, E> WriteJob for Queued<F, R, E>
where
    F: FnMut(&mut Prepared<'_>) -> Result<R, E> + Send,
    R: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    fn run(&mut self, conn: &mut Prepared<'_>) -> bool {
        self.result = None;
        let result = (self.f)(conn);
        let keep = result.is_ok();
        self.result = Some(result);
        keep
    }

    fn finish(self: Box<Self>) -> Finish {
        let Queued { result, answer, .. } = *self;
        // A job that never ran to the end (it panicked, or the batch broke
        // before its turn) changed nothing.
        let result = result.unwrap_or_else(|| Err(E::from(StoreError::NotRun)));
        match answer {
            Answer::Durable(tx) => Finish {
                urgent: true,
                committed: None,
                synced: Box::new(move |outcome| {
                    let _ = tx.send(settle(result, outcome));
                }),
            },
            Answer::Staged(tx, when) => {
                let (sync_tx, sync_rx) = oneshot::channel();
                Finish {
                    urgent: when == SyncWhen::Now,
                    committed: Some(Box::new(move |outcome| {
                        let _ = tx.send(settle(result, outcome).map(|value| (value, Synced::new(sync_rx))));
                    })),
                    synced: Box::new(move |outcome| {
                        let _ = sync_tx.send(outcome.map_err(str::to_owned));
                    }),
                }
            }
        }
    }
}

/// Most writes committed together; bounds the latency of a batch.
const MAX_BATCH: usize = 512;
/// Writes waiting for the writer. When full, callers wait (backpressure).
const WRITE_QUEUE: usize = 4096;
/// Committed batches waiting for the syncer. When full, the writer waits.
const SYNC_QUEUE: usize = 64;
/// The longest a deferred write waits for its fsync.
const DEFER_SYNC_AT_MOST: Duration = Duration::from_millis(5);
/// How long a connection waits for a lock that another connection of this
/// process holds (a checkpoint, a store being closed) before failing busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle to one SQLite file; cheap to clone.
#[derive(Clone)]
pub(crate) struct SqliteStore {
    writes: mpsc::Sender<Box<dyn WriteJob>>,
    readers: Arc<Readers>,
    watermark: Watermark,
    /// How a durable read asks the syncer not to wait; `None` when nothing
    /// is synced.
    hurry: Option<Hurry>,
    /// How many fsyncs of the WAL the store made.
    #[cfg(test)]
    fsyncs: Arc<AtomicU64>,
}

/// A durable read's way to have deferred batches synced now.
#[derive(Clone)]
struct Hurry {
    /// The highest batch a durable read waits for.
    wanted: Arc<AtomicU64>,
    to_sync: SyncSender<SyncWork>,
}

/// Read connections, taken by a read and given back after it. Every one is
/// kept until the store closes: SQLite does not close the file of a
/// connection closed while others of the process hold the file (that would
/// drop the process's lock), so a pool that closed spare readers would leak
/// a descriptor each time. The pool grows to the most reads that ever ran
/// at once, which the threads that run reads bound.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(conn);
    }
}

/// Statements each connection keeps prepared: every statement the services
/// run, with room to spare (rusqlite keeps 16 by default, fewer than the
/// coordinator uses).
const STATEMENT_CACHE: usize = 128;

/// Opens a connection on the `unix-excl` VFS: this process holds the file
/// exclusively. Its connections then lock each other in memory rather than
/// with `fcntl` calls on every transaction (about a hundred per purchase
/// at concurrency 1), the WAL index lives in the heap rather than in a
/// mapped `-shm` file, and a second process opening the same file (a
/// second mesh on one data directory) is refused instead of sharing it.
/// Every connection, readers included, is opened read-write: on this VFS a
/// read-only connection's locks go to `fcntl` and would replace the
/// process's exclusive lock.
fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), c"unix-excl")
        .map_err(|source| open_failed(path, source.to_string()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // A prepared statement keeps its plan whatever values are bound. By
    // default SQLite plans again when a bound value changes if the plan
    // could use it (`writer = ?1 AND seq > ?2`), which re-parsed the
    // relay's query on every run.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // Savepoint journals stay in memory.
    conn.execute_batch("PRAGMA temp_store = MEMORY")?;
    Ok(conn)
}

/// Why the store at `path` could not be opened.
fn open_failed(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let reader = open_connection(path)?;
    reader.execute_batch("PRAGMA query_only = ON")?;
    Ok(reader)
}

impl SqliteStore {
    /// Opens (or creates) the file, applies the migrations not yet applied
    /// (tracked in `PRAGMA user_version`) and starts the writer and reader.
    pub(crate) fn open(
        path: &Path,
        durability: Durability,
        migrations: &[&str],
    ) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_deferring(path, durability, migrations, DEFER_SYNC_AT_MOST)
    }

    /// Opens the store with deferred syncs waiting at most `defer`.
    fn open_deferring(
        path: &Path,
        durability: Durability,
        migrations: &[&str],
        defer: Duration,
    ) -> Result<SqliteStore, StoreError> {
        let writer = open_connection(path)?;
        // The first statement that reads the file takes it for this process.
        // Busy here means another process holds it once the busy timeout has
        // passed; the wait is for a store of this process that was just
        // dropped and may still be closing the file.
        writer
            .execute_batch("PRAGMA journal_mode = WAL")
            .map_err(|e| match e.sqlite_error_code() {
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => open_failed(
                    path,
                    "another process has it open (a store serves one process at a time: is another sagamesh \
                     running on this data directory?)",
                ),
                _ => e.into(),
            })?;
        // NORMAL: a commit writes the WAL without fsync; the writer syncs
        // the WAL itself when the durability asks for it (see `Syncer`).
        writer.execute_batch(
            "PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON;",
        )?;
        migrate(&writer, migrations)?;
        let fsyncs = Arc::new(AtomicU64::new(0));
        let mut syncer = Syncer {
            wal_path: durability_wal(path, durability),
            wal: None,
            fsyncs: Arc::clone(&fsyncs),
        };
        // The WAL holds whatever the last run committed, synced or not (it
        // may have died between a commit and its fsync): sync it before any
        // read can pass it on.
        syncer.sync().map_err(|reason| open_failed(path, reason))?;
        let readers = Arc::new(Readers {
            path: path.to_owned(),
            idle: Mutex::new(vec![open_reader(path)?]),
        });

        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (writes, write_rx) = mpsc::channel(WRITE_QUEUE);
        let (marker, watermark) = synced::marks();
        let spawn_error = |e: std::io::Error| StoreError::Commit(e.to_string());
        let (syncer, hurry) = if syncer.wal_path.is_some() {
            let wal = Arc::new(Mutex::new(syncer));
            let (to_sync, sync_rx) = std::sync::mpsc::sync_channel(SYNC_QUEUE);
            let hurry = Hurry {
                wanted: Arc::new(AtomicU64::new(0)),
                to_sync: to_sync.clone(),
            };
            let (shared, marker, wanted) = (wal.clone(), marker.clone(), hurry.wanted.clone());
            std::thread::Builder::new()
                .name(format!("{name}-sync"))
                .spawn(move || {
                    sched::run_as_batch_work();
                    run_syncer(&shared, &marker, &wanted, defer, sync_rx)
                })
                .map_err(spawn_error)?;
            let handle = SyncHandle {
                wal,
                to_sync,
                deferred: false,
            };
            (Some(handle), Some(hurry))
        } else {
            (None, None)
        };
        std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || {
                sched::run_as_batch_work();
                run_writer(writer, syncer, &marker, write_rx)
            })
            .map_err(spawn_error)?;
        Ok(SqliteStore {
            writes,
            readers,
            watermark,
            hurry,
            #[cfg(test)]
            fsyncs,
        })
    }

    /// Runs `f` in a write transaction shared with other callers. Returns
    /// once the transaction is durable. An `Err` from `f` rolls back only
    /// what `f` did. `f` may run more than once (only its last run counts),
    /// so it must do nothing but run statements, and they change rows, not
    /// the schema (see [`commit_batch`]).
    pub(crate) async fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnMut(&mut Prepared<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Answer::Durable(tx), f, rx).await
    }

    /// Like [`Store::write`], but returns as soon as the transaction is
    /// committed, before its fsync: its effects are visible and survive the
    /// process dying. The returned [`Synced`] resolves once it also survives
    /// the machine. Use it only where whatever acts on the result early can
    /// be redone from a durable copy kept elsewhere. `when` says whether
    /// the commit asks for an fsync of its own.
    pub(crate) async fn write_staged<R, E, F>(&self, f: F, when: SyncWhen) -> Result<(R, Synced), E>
    where
        F: FnMut(&mut Prepared<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Answer::Staged(tx, when), f, rx).await
    }

    /// How many fsyncs of the WAL the store made since it opened.
    #[cfg(test)]
    fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    /// Queues `f` for the writer and waits for the answer it sends on `rx`.
    async fn submit<F, R, E, T>(
        &self,
        answer: Answer<R, E>,
        f: F,
        rx: oneshot::Receiver<Result<T, E>>,
    ) -> Result<T, E>
    where
        F: FnMut(&mut Prepared<'_>) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let job = Box::new(Queued {
            f,
            result: None,
            answer,
        });
        crate::hand_over(&self.writes, job, rx).await
    }

    /// Runs `f` on a read connection, which sees the last commit, on the
    /// caller's thread (keep reads short: a page, not a scan).
    pub(crate) async fn read<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&Connection) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let conn = self.readers.take().map_err(E::from)?;
        // A panicking read loses its connection, not the caller's task.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&conn)))
            .map_err(|_| E::from(StoreError::ReadPanicked))?;
        self.readers.give_back(conn);
        result
    }

    /// Like [`SqliteStore::read`], but returns only once what the read saw
    /// is durable: it waits for the sync of every commit it could see.
    pub(crate) async fn read_durable<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&Connection) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let result = self.read(f).await?;
        let seen = self.watermark.seen();
        if !self.watermark.is_synced(seen)
            && let Some(hurry) = &self.hurry
        {
            hurry.wanted.fetch_max(seen, Ordering::SeqCst);
            // A full queue means the syncer has work in hand and will look
            // at `wanted` when it takes the next.
            let _ = hurry.to_sync.try_send(SyncWork::Hurry);
        }
        self.watermark.covers(seen).await.map_err(E::from)?;
        Ok(result)
    }
}

/// The WAL path whose fsync makes commits durable, if the durability asks
/// for fsyncs at all.
fn durability_wal(path: &Path, durability: Durability) -> Option<PathBuf> {
    match durability {
        Durability::Machine => {
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            Some(wal.into())
        }
        Durability::Process => None,
    }
}

/// Makes committed transactions survive the machine by syncing the WAL
/// file, which holds every commit since the last checkpoint (checkpoints
/// sync on their own). Syncing it after a batch is what
/// `synchronous = FULL` does inside each commit, moved out so that staged
/// writes can be answered in between.
struct Syncer {
    /// `None` under `Durability::Process`: nothing to sync.
    wal_path: Option<PathBuf>,
    /// Opened at the first sync; SQLite keeps the file while it is open.
    wal: Option<File>,
    /// How many fsyncs it made.
    fsyncs: Arc<AtomicU64>,
}

impl Syncer {
    fn sync(&mut self) -> Result<(), String> {
        let Some(path) = &self.wal_path else {
            return Ok(());
        };
        if self.wal.is_none() {
            let file = match File::open(path) {
                Ok(file) => file,
                // No WAL yet: every commit is in the database file, synced.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(format!("cannot open the WAL for sync: {e}")),
            };
            self.wal = Some(file);
        }
        let Some(wal) = &self.wal else {
            unreachable!("opened above")
        };
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        wal.sync_data()
            .map_err(|e| format!("fsync of the WAL failed: {e}"))
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

/// How the writer gets its commits synced: itself, or through the syncer
/// thread when more writes are waiting or the batch's sync may wait.
struct SyncHandle {
    wal: Arc<Mutex<Syncer>>,
    to_sync: SyncSender<SyncWork>,
    /// Whether deferred batches may be waiting at the syncer.
    deferred: bool,
}

/// What the syncer is handed.
enum SyncWork {
    /// Committed batches through this number, and their writes' answers.
    Batches {
        through: u64,
        waiting: Vec<Completion>,
        /// Whether they must be synced now, or may wait.
        urgent: bool,
    },
    /// The writer synced the WAL itself, with this outcome, after every
    /// batch handed over before: their writes are answered with it.
    SyncedByWriter(Result<(), String>),
    /// A durable read waits (see `Hurry::wanted`).
    Hurry,
}

/// Syncs the WAL, which makes every batch up to `through` durable, and
/// says so.
fn sync(wal: &Mutex<Syncer>, marker: &Marker, through: u64) -> Result<(), String> {
    if marker.has_failed() {
        // Linux may have dropped the pages a failed fsync could not
        // write: no later fsync proves anything durable.
        return Err("an earlier fsync of the store failed; restart the service".to_owned());
    }
    let outcome = wal.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).sync();
    match &outcome {
        Ok(()) => marker.synced_through(through),
        Err(e) => {
            tracing::error!(error = %e, "store sync failed");
            marker.sync_failed();
        }
    }
    outcome
}

/// Syncs the WAL through batch `through`, then answers every write in
/// `waiting`.
fn sync_and_answer(wal: &Mutex<Syncer>, marker: &Marker, through: u64, waiting: &mut Vec<Completion>) {
    let outcome = sync(wal, marker, through);
    answer(waiting, &outcome);
}

/// Answers every write in `waiting` with `outcome`.
fn answer(waiting: &mut Vec<Completion>, outcome: &Result<(), String>) {
    let outcome = outcome.as_ref().map(|_| ()).map_err(String::as_str);
    for complete in waiting.drain(..) {
        complete(outcome);
    }
}

/// Commits batches of queued jobs; `syncer` is `None` when the durability
/// asks for no fsync.
fn run_writer(
    conn: Connection,
    mut syncer: Option<SyncHandle>,
    marker: &Marker,
    mut jobs: mpsc::Receiver<Box<dyn WriteJob>>,
) {
    let mut prepared = Prepared::new(&conn);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut completions: Vec<Completion> = Vec::with_capacity(MAX_BATCH);
    let mut synced: Vec<Completion> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut urgent = false;
        let changes = prepared.total_changes();
        let outcome = commit_and_answer(
            &mut prepared,
            marker,
            &mut batch,
            &mut completions,
            &mut synced,
            &mut urgent,
        );
        // This batch's number, or the last one's if it failed before `COMMIT`.
        let number = marker.last_begun();
        let Some(syncer) = &mut syncer else {
            // Nothing to sync: a commit is as durable as the store promises.
            marker.synced_through(number);
            answer(&mut synced, &outcome);
            continue;
        };
        if outcome.is_err() {
            // Nothing of this batch is on disk, but readers that saw earlier
            // commits may wait for its number: sync them.
            let synced_earlier = sync(&syncer.wal, marker, number);
            answer(&mut synced, &outcome);
            syncer.tell_deferred(synced_earlier);
            continue;
        }
        if prepared.total_changes() == changes && marker.synced_before(number) {
            // It wrote nothing, and every batch before it is synced: what
            // its writes read is durable already.
            marker.synced_through(number);
            answer(&mut synced, &outcome);
            continue;
        }
        if !urgent || !jobs.is_empty() {
            // More to commit, or a sync that may wait: the syncer waits
            // for the disk instead.
            let waiting = std::mem::replace(&mut synced, Vec::with_capacity(MAX_BATCH));
            let work = SyncWork::Batches {
                through: number,
                waiting,
                urgent,
            };
            match syncer.to_sync.send(work) {
                Ok(()) => {
                    // An urgent batch has the syncer sync what it holds.
                    syncer.deferred = !urgent;
                    continue;
                }
                Err(std::sync::mpsc::SendError(work)) => {
                    if let SyncWork::Batches { waiting, .. } = work {
                        synced = waiting;
                    }
                }
            }
        }
        let outcome = sync(&syncer.wal, marker, number);
        answer(&mut synced, &outcome);
        syncer.tell_deferred(outcome);
    }
}

impl SyncHandle {
    /// After the writer synced the WAL itself: the deferred batches at the
    /// syncer, all committed before, are answered with the same outcome.
    fn tell_deferred(&mut self, outcome: Result<(), String>) {
        if std::mem::take(&mut self.deferred) {
            let _ = self.to_sync.send(SyncWork::SyncedByWriter(outcome));
        }
    }
}

/// Commits the batch (rolling back what is left of a failed one) and
/// answers the writes that wait only for the commit; the answers due once
/// synced are left in `synced`.
fn commit_and_answer(
    conn: &mut Prepared<'_>,
    marker: &Marker,
    batch: &mut Vec<Box<dyn WriteJob>>,
    committed: &mut Vec<Completion>,
    synced: &mut Vec<Completion>,
    urgent: &mut bool,
) -> Result<(), String> {
    let outcome = commit_batch(conn, marker, batch, committed, synced, urgent);
    if let Err(e) = &outcome {
        tracing::error!(error = %e, writes = synced.len(), "store commit failed");
        // The batch may have failed before its transaction began.
        if !conn.is_autocommit()
            && let Err(e) = conn.execute_batch("ROLLBACK")
        {
            tracing::error!(error = %e, "store rollback failed; later writes will fail until a restart");
        }
    }
    answer(committed, &outcome);
    outcome
}

/// Syncs the WAL for the batches handed over, then answers their writes:
/// at once for urgent batches, and for deferred ones when a durable read
/// waits for them or the oldest has waited `defer`. One fsync covers
/// every batch handed over before it began.
fn run_syncer(
    wal: &Mutex<Syncer>,
    marker: &Marker,
    wanted: &AtomicU64,
    defer: Duration,
    work: Receiver<SyncWork>,
) {
    use std::sync::mpsc::RecvTimeoutError;

    let mut waiting: Vec<Completion> = Vec::with_capacity(MAX_BATCH);
    let mut through = 0;
    // When the oldest deferred batch held must be synced.
    let mut due: Option<std::time::Instant> = None;
    loop {
        let first = match due {
            None => work.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => work.recv_timeout(at.saturating_duration_since(std::time::Instant::now())),
        };
        let mut urgent = false;
        match first {
            Ok(first) => {
                for item in std::iter::once(first).chain(work.try_iter()) {
                    match item {
                        SyncWork::Batches {
                            through: number,
                            waiting: more,
                            urgent: now,
                        } => {
                            through = number;
                            waiting.extend(more);
                            urgent |= now;
                            due.get_or_insert_with(|| std::time::Instant::now() + defer);
                        }
                        SyncWork::SyncedByWriter(outcome) => {
                            answer(&mut waiting, &outcome);
                            urgent = false;
                            due = None;
                        }
                        SyncWork::Hurry => {}
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => urgent = true,
            Err(RecvTimeoutError::Disconnected) => {
                if !waiting.is_empty() {
                    sync_and_answer(wal, marker, through, &mut waiting);
                }
                return;
            }
        }
        let read_waits = {
            let wanted = wanted.load(Ordering::SeqCst);
            wanted > marker.synced_now() && through >= wanted
        };
        if !waiting.is_empty() && (urgent || read_waits) {
            sync_and_answer(wal, marker, through, &mut waiting);
        }
        if waiting.is_empty() {
            due = None;
        }
    }
}

/// Runs every job of the batch in one transaction and commits it.
///
/// Jobs run without savepoints while none fails after writing: a savepoint
/// copies every page its job touches, about a quarter of a busy writer's
/// work. A job that fails having changed no rows needs no undoing. One that
/// fails after writing is undone by rolling the whole transaction back and
/// running the jobs kept so far again; from then on each job of the batch
/// runs in its own savepoint, so that no job runs more than twice.
fn commit_batch(
    conn: &mut Prepared<'_>,
    marker: &Marker,
    batch: &mut Vec<Box<dyn WriteJob>>,
    committed: &mut Vec<Completion>,
    synced: &mut Vec<Completion>,
    urgent: &mut bool,
) -> Result<(), String> {
    let mut ran = Vec::with_capacity(batch.len());
    // Once the transaction is broken, the rest of the batch is not run, and
    // those jobs are answered `StoreError::NotRun`. A job that ran is
    // answered with its own error, or the batch's.
    let outcome = run_batch(conn, batch, &mut ran);
    let not_run = batch.drain(..);
    for job in ran.into_iter().map(|(job, _)| job).chain(not_run) {
        let finish = job.finish();
        committed.extend(finish.committed);
        synced.push(finish.synced);
        *urgent |= finish.urgent;
    }
    outcome?;
    marker.begin_batch();
    control(conn, "COMMIT")
}

/// Runs the jobs into `ran`, each with whether it is kept.
fn run_batch(
    conn: &mut Prepared<'_>,
    batch: &mut Vec<Box<dyn WriteJob>>,
    ran: &mut Vec<(Box<dyn WriteJob>, bool)>,
) -> Result<(), String> {
    control(conn, "BEGIN IMMEDIATE")?;
    let mut isolated = false;
    // Taken from the end, so that an early return leaves the jobs not run
    // in `batch`, to be answered.
    batch.reverse();
    while let Some(job) = batch.pop() {
        let index = ran.len();
        ran.push((job, false));
        let keep = if isolated {
            run_isolated(conn, ran[index].0.as_mut())?
        } else {
            let changes = conn.total_changes();
            let keep = run_job(conn, ran[index].0.as_mut())?;
            if !keep && conn.total_changes() != changes {
                control(conn, "ROLLBACK")?;
                control(conn, "BEGIN IMMEDIATE")?;
                // With nothing kept before it, the transaction is as new.
                isolated = ran[..index].iter().any(|(_, kept)| *kept);
                for (job, kept) in ran[..index].iter_mut().filter(|(_, kept)| *kept) {
                    *kept = run_isolated(conn, job.as_mut())?;
                }
            }
            keep
        };
        ran[index].1 = keep;
    }
    Ok(())
}

/// Runs a job in its own savepoint, undone alone if it fails.
fn run_isolated(conn: &mut Prepared<'_>, job: &mut dyn WriteJob) -> Result<bool, String> {
    control(conn, "SAVEPOINT job")?;
    let keep = run_job(conn, job)?;
    if !keep {
        control(conn, "ROLLBACK TO job")?;
    }
    control(conn, "RELEASE job")?;
    Ok(keep)
}

/// Runs a job; says whether to keep it. A panicking job must not take the
/// writer down with it: it is not kept and its caller sees the write fail.
/// `Err` when the batch's transaction is gone: SQLite rolls back the whole
/// transaction on some errors (an I/O error, a full disk), and then
/// nothing that ran before is kept either.
fn run_job(conn: &mut Prepared<'_>, job: &mut dyn WriteJob) -> Result<bool, String> {
    let keep =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(conn))).unwrap_or_else(|_| {
            tracing::error!("a store write panicked; rolled back");
            false
        });
    if conn.is_autocommit() {
        return Err("SQLite rolled the batch's transaction back".to_owned());
    }
    Ok(keep)
}

/// Runs a transaction-control statement, prepared once per connection.
fn control(conn: &mut Prepared<'_>, sql: &str) -> Result<(), String> {
    conn.statement(sql)
        .and_then(|mut statement| statement.execute([]))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const MIGRATIONS: &[&str] = &["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
        -- What SQLite does on an I/O error or a full disk: it rolls back the
        -- whole transaction, not only the statement.
        CREATE TRIGGER roll_everything_back BEFORE INSERT ON notes WHEN NEW.body = 'roll back'
        BEGIN SELECT RAISE(ROLLBACK, 'rolled back by SQLite'); END"];

    fn insert(
        body: &'static str,
    ) -> impl FnMut(&mut Prepared<'_>) -> Result<i64, StoreError> + Send + 'static {
        move |conn| {
            conn.execute("INSERT INTO notes (body) VALUES (?1)", [body])?;
            Ok(conn.last_insert_rowid())
        }
    }

    async fn count(store: &SqliteStore) -> i64 {
        store
            .read(|conn| Ok::<_, StoreError>(conn.query_row("SELECT count(*) FROM notes", [], |r| r.get(0))?))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_staged_write_is_visible_at_once_and_durable_after_its_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("notes.db"), Durability::Machine, MIGRATIONS).unwrap();
        let (id, synced) = store.write_staged(insert("first"), SyncWhen::Now).await.unwrap();
        assert_eq!(id, 1);
        assert_eq!(count(&store).await, 1, "committed before the sync");
        synced.durable().await.unwrap();
        assert_eq!(store.write(insert("second")).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_durable_read_returns_what_it_saw_once_synced_whatever_the_durability() {
        for durability in [Durability::Machine, Durability::Process] {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("notes.db"), durability, MIGRATIONS).unwrap();
            let (_, synced) = store.write_staged(insert("staged"), SyncWhen::Now).await.unwrap();
            let seen = store
                .read_durable(|conn| {
                    Ok::<i64, StoreError>(conn.query_row("SELECT count(*) FROM notes", [], |r| r.get(0))?)
                })
                .await
                .unwrap();
            assert_eq!(seen, 1, "{durability:?}");
            synced.durable().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_failing_staged_write_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("notes.db"), Durability::Machine, MIGRATIONS).unwrap();
        let failing = store.write_staged(
            |conn| {
                conn.execute("INSERT INTO notes (body) VALUES ('lost')", [])?;
                Err::<(), _>(StoreError::Commit("refused".into()))
            },
            SyncWhen::Now,
        );
        let kept = store.write_staged(insert("kept"), SyncWhen::Now);
        let (failing, kept) = tokio::join!(failing, kept);
        assert!(matches!(failing, Err(StoreError::Commit(reason)) if reason == "refused"));
        kept.unwrap().1.durable().await.unwrap();
        assert_eq!(count(&store).await, 1);
    }

    /// Waits for a staged or deferred write's sync, failing the test if it
    /// never comes.
    async fn synced_soon(synced: Synced) {
        tokio::time::timeout(Duration::from_secs(10), synced.durable())
            .await
            .expect("the write was never synced")
            .unwrap();
    }

    fn is_durable_yet(synced: &mut Synced) -> bool {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(&mut synced.0).poll(&mut context).is_ready()
    }

    /// A store whose deferred writes would wait an hour for a sync of
    /// their own.
    fn deferring_store(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open_deferring(
            &dir.path().join("notes.db"),
            Durability::Machine,
            MIGRATIONS,
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn deferred_writes_are_synced_by_the_next_write_that_asks_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = deferring_store(&dir);
        let before = store.fsyncs();
        let mut deferred = Vec::new();
        for _ in 0..3 {
            let (_, synced) = store
                .write_staged(insert("deferred"), SyncWhen::Deferred)
                .await
                .unwrap();
            deferred.push(synced);
        }
        assert_eq!(count(&store).await, 3, "visible once committed");
        assert!(
            deferred.iter_mut().all(|synced| !is_durable_yet(synced)),
            "nothing asked for a sync yet"
        );
        // A write that asks for its sync syncs the ones before it too.
        store.write(insert("durable")).await.unwrap();
        for synced in deferred {
            synced_soon(synced).await;
        }
        assert_eq!(store.fsyncs(), before + 1, "four commits, one fsync");

        // Mixed with concurrent durable writes, every deferred one is
        // synced too (whether the writer or the syncer thread syncs). The
        // last write queued is a durable one.
        let mixed = (0..64).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let (_, synced) = store
                        .write_staged(insert("deferred"), SyncWhen::Deferred)
                        .await
                        .unwrap();
                    synced_soon(synced).await;
                } else {
                    store.write(insert("durable")).await.unwrap();
                }
            })
        });
        for write in mixed.collect::<Vec<_>>() {
            write.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_write_that_changes_nothing_makes_no_fsync_once_the_rest_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = deferring_store(&dir);
        store.write(insert("durable")).await.unwrap();
        let before = store.fsyncs();
        let count_notes = |conn: &mut Prepared<'_>| {
            Ok::<i64, StoreError>(conn.query_row("SELECT count(*) FROM notes", [], |r| r.get(0))?)
        };
        assert_eq!(store.write(count_notes).await.unwrap(), 1);
        assert_eq!(store.fsyncs(), before, "nothing to sync");

        // After a deferred write, what it reads may not be durable yet: it
        // waits for that sync.
        let (_, deferred) = store
            .write_staged(insert("deferred"), SyncWhen::Deferred)
            .await
            .unwrap();
        assert_eq!(store.write(count_notes).await.unwrap(), 2);
        synced_soon(deferred).await;
        assert_eq!(store.fsyncs(), before + 1);
    }

    #[test]
    fn once_an_fsync_failed_no_later_sync_answers_durable() {
        let dir = tempfile::tempdir().unwrap();
        let wal_path = dir.path().join("notes.db-wal");
        std::fs::write(&wal_path, b"frames").unwrap();
        let fsyncs = Arc::new(AtomicU64::new(0));
        let wal = Mutex::new(Syncer {
            wal_path: Some(wal_path),
            wal: None,
            fsyncs: Arc::clone(&fsyncs),
        });
        let (marker, _watermark) = synced::marks();
        assert!(sync(&wal, &marker, 1).is_ok());
        marker.sync_failed();
        let refused = sync(&wal, &marker, 2).unwrap_err();
        assert!(refused.contains("earlier fsync"), "{refused}");
        assert_eq!(fsyncs.load(Ordering::Relaxed), 1, "no fsync after the failure");
    }

    #[tokio::test]
    async fn a_durable_read_has_deferred_writes_synced_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = deferring_store(&dir);
        let (_, mut deferred) = store
            .write_staged(insert("deferred"), SyncWhen::Deferred)
            .await
            .unwrap();
        assert!(!is_durable_yet(&mut deferred));
        let seen = tokio::time::timeout(
            Duration::from_secs(10),
            store.read_durable(|conn| {
                Ok::<i64, StoreError>(conn.query_row("SELECT count(*) FROM notes", [], |r| r.get(0))?)
            }),
        )
        .await
        .expect("the read waited for the deferred sync")
        .unwrap();
        assert_eq!(seen, 1);
        synced_soon(deferred).await;
    }

    #[tokio::test]
    async fn a_deferred_write_alone_is_synced_within_the_deferral() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("notes.db"), Durability::Machine, MIGRATIONS).unwrap();
        let (_, synced) = store
            .write_staged(insert("alone"), SyncWhen::Deferred)
            .await
            .unwrap();
        synced_soon(synced).await;
    }

    /// A writer connection to a new notes file (the directory lives as long
    /// as the returned guard).
    fn notes_connection() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("notes.db")).unwrap();
        migrate(&conn, MIGRATIONS).unwrap();
        (dir, conn)
    }

    /// A job for `commit_batch`: inserts its note (or not) and keeps it
    /// (or not), counting its runs.
    struct Note {
        body: &'static str,
        writes: bool,
        keep: bool,
        runs: Arc<AtomicUsize>,
    }

    impl WriteJob for Note {
        fn run(&mut self, conn: &mut Prepared<'_>) -> bool {
            self.runs.fetch_add(1, Ordering::Relaxed);
            if self.writes {
                conn.execute("INSERT INTO notes (body) VALUES (?1)", [self.body])
                    .unwrap();
            }
            self.keep
        }

        fn finish(self: Box<Self>) -> Finish {
            Finish {
                urgent: true,
                committed: None,
                synced: Box::new(|_| {}),
            }
        }
    }

    /// Commits one batch of `(body, writes, keep)` jobs; returns the notes
    /// stored and how often each job ran.
    fn commit_notes(conn: &Connection, jobs: &[(&'static str, bool, bool)]) -> (Vec<String>, Vec<usize>) {
        let runs: Vec<_> = jobs.iter().map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let mut batch: Vec<Box<dyn WriteJob>> = jobs
            .iter()
            .zip(&runs)
            .map(|(&(body, writes, keep), runs)| {
                Box::new(Note {
                    body,
                    writes,
                    keep,
                    runs: runs.clone(),
                }) as Box<dyn WriteJob>
            })
            .collect();
        commit_batch(
            &mut Prepared::new(conn),
            &synced::marks().0,
            &mut batch,
            &mut Vec::new(),
            &mut Vec::new(),
            &mut false,
        )
        .unwrap();
        assert!(conn.is_autocommit(), "the batch's transaction is over");
        let mut notes = conn.prepare("SELECT body FROM notes ORDER BY id").unwrap();
        let notes = notes
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        conn.execute("DELETE FROM notes", []).unwrap();
        (
            notes,
            runs.iter().map(|runs| runs.load(Ordering::Relaxed)).collect(),
        )
    }

    #[test]
    fn a_failing_job_rolls_back_alone_wherever_it_is_in_the_batch() {
        let (_dir, conn) = notes_connection();
        let (notes, runs) = commit_notes(&conn, &[("first lost", true, false), ("second kept", true, true)]);
        assert_eq!(notes, ["second kept"]);
        assert_eq!(runs, [1, 1]);
        // The first job runs again after the second is rolled back with
        // the transaction; from then on each job has its own savepoint.
        let (notes, runs) = commit_notes(
            &conn,
            &[
                ("first kept", true, true),
                ("second lost", true, false),
                ("third kept", true, true),
                ("fourth lost", true, false),
                ("fifth kept", true, true),
            ],
        );
        assert_eq!(notes, ["first kept", "third kept", "fifth kept"]);
        assert_eq!(runs, [2, 1, 1, 1, 1]);
    }

    #[test]
    fn a_job_failing_before_it_writes_costs_no_rollback() {
        let (_dir, conn) = notes_connection();
        let (notes, runs) = commit_notes(
            &conn,
            &[
                ("first kept", true, true),
                ("refused", false, false),
                ("third kept", true, true),
            ],
        );
        assert_eq!(notes, ["first kept", "third kept"]);
        assert_eq!(runs, [1, 1, 1]);
    }

    /// A caller's write for `commit_batch`: inserts `body`, then fails or
    /// panics if asked; answers how many notes it saw after its insert.
    fn counting(
        body: &'static str,
        outcome: &'static str,
    ) -> (Box<dyn WriteJob>, oneshot::Receiver<Result<i64, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        let f = move |conn: &mut Prepared<'_>| {
            conn.execute("INSERT INTO notes (body) VALUES (?1)", [body])?;
            match outcome {
                "fail" => Err(StoreError::Commit("refused".into())),
                "panic" => panic!("a write that panics after writing"),
                _ => Ok(conn.query_row("SELECT count(*) FROM notes", [], |row| row.get(0))?),
            }
        };
        let job = Box::new(Queued {
            f,
            result: None,
            answer: Answer::Durable(tx),
        });
        (job, rx)
    }

    /// Commits the batch as the writer does and answers it as synced.
    fn commit_and_sync(conn: &Connection, batch: Vec<Box<dyn WriteJob>>) -> Result<(), String> {
        let (mut batch, mut synced) = (batch, Vec::new());
        let outcome = commit_and_answer(
            &mut Prepared::new(conn),
            &synced::marks().0,
            &mut batch,
            &mut Vec::new(),
            &mut synced,
            &mut false,
        );
        answer(&mut synced, &outcome);
        outcome
    }

    #[test]
    fn a_write_run_again_is_answered_with_its_last_run() {
        let (_dir, conn) = notes_connection();
        let (first, mut first_answer) = counting("first", "ok");
        let (failing, mut failing_answer) = counting("failing", "fail");
        let (panicking, mut panicking_answer) = counting("panicking", "panic");
        let (last, mut last_answer) = counting("last", "ok");
        commit_and_sync(&conn, vec![first, failing, panicking, last]).unwrap();
        // The first write ran twice, and both runs saw one note: its own.
        assert_eq!(first_answer.try_recv().unwrap().unwrap(), 1);
        assert!(
            matches!(failing_answer.try_recv().unwrap(), Err(StoreError::Commit(reason)) if reason == "refused")
        );
        assert!(matches!(
            panicking_answer.try_recv().unwrap(),
            Err(StoreError::NotRun)
        ));
        assert_eq!(last_answer.try_recv().unwrap().unwrap(), 2);
        let count: i64 = conn
            .query_row("SELECT count(*) FROM notes", [], |row| row.get(0))
            .unwrap();
        assert_eq!(count, 2, "only the kept writes' notes");
    }

    #[test]
    fn a_transaction_sqlite_rolled_back_fails_the_whole_batch() {
        let (_dir, conn) = notes_connection();
        let (before, mut before_answer) = counting("before", "ok");
        let (rolling, mut rolling_answer) = counting("roll back", "ok");
        let (after, mut after_answer) = counting("after", "ok");
        let outcome = commit_and_sync(&conn, vec![before, rolling, after]);
        assert!(outcome.is_err(), "{outcome:?}");
        assert!(conn.is_autocommit());
        // Nothing was committed, and no write is told it was.
        let count: i64 = conn
            .query_row("SELECT count(*) FROM notes", [], |row| row.get(0))
            .unwrap();
        assert_eq!(count, 0);
        assert!(matches!(
            before_answer.try_recv().unwrap(),
            Err(StoreError::Commit(_))
        ));
        assert!(
            matches!(rolling_answer.try_recv().unwrap(), Err(StoreError::Sql(reason)) if reason.contains("rolled back by SQLite"))
        );
        assert!(
            matches!(after_answer.try_recv().unwrap(), Err(StoreError::NotRun)),
            "the rest of the batch is not run, and says so"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_all_answer_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("notes.db"), Durability::Machine, MIGRATIONS).unwrap();
        // Enough at once that the writer finds more waiting after a commit
        // and hands its fsyncs to the syncer thread.
        let writes: Vec<_> = (0..500)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.write(insert("note")).await })
            })
            .collect();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        assert_eq!(count(&store).await, 500);
    }

    #[tokio::test]
    async fn writes_survive_reopening_under_both_durabilities() {
        for durability in [Durability::Machine, Durability::Process] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notes.db");
            {
                let store = SqliteStore::open(&path, durability, MIGRATIONS).unwrap();
                store.write(insert("kept")).await.unwrap();
            }
            let store = SqliteStore::open(&path, durability, MIGRATIONS).unwrap();
            assert_eq!(count(&store).await, 1, "{durability:?}");
        }
    }
}
