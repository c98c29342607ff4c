//! The PostgreSQL engine, for services that share their state among
//! replicas: a service's tables live in a schema of its own, so several
//! services (or test runs) share one database.
//!
//! Like the SQLite engine it runs writes on threads of its own, commits
//! what waits in one transaction and answers after the commit
//! (PostgreSQL's own commit is durable, so a staged write is answered then
//! too). Unlike it, a batch has no savepoints, which would cost two round
//! trips a write: when a write fails, the batch is rolled back and each
//! write runs again alone (see [`commit_batch`]). There are [`WRITERS`]
//! writer threads, each with its connection, so commits overlap and
//! PostgreSQL shares WAL flushes among them, and [`READERS`] reader
//! threads. The threads use the
//! synchronous `postgres` client, so no call ever blocks an async worker.
//! Statements are prepared once per connection and reused.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, NoTls, Statement};
use tokio::sync::{mpsc, oneshot};

use crate::{Row, StoreError, Synced, Tx, Value};

/// Writes and reads waiting for their thread. When full, callers wait.
const QUEUE: usize = 4096;
/// Writer connections per store. Every instance of every service opens
/// `WRITERS + READERS` connections: keep them few, PostgreSQL's default
/// limit is a hundred.
pub(crate) const WRITERS: usize = 2;
/// Reader connections per store.
const READERS: usize = 2;

/// A queued read: runs once and answers its caller.
type ReadJob = Box<dyn FnOnce(&mut PgTx<'_>) + Send>;

/// A queued write. It may run twice: in a batch that is then rolled back,
/// and again alone (see [`commit_batch`]); only its last run counts.
trait WriteJob: Send {
    /// Runs the write's statements; says whether to keep them.
    fn run(&mut self, tx: &mut PgTx<'_>) -> bool;
    /// Forgets the result of a run whose transaction was rolled back, so
    /// that it is never answered. A write that panicked keeps its result:
    /// it does not run again.
    fn reset(&mut self);
    /// Whether the write panicked.
    fn panicked(&self) -> bool;
    /// Answers the caller with the last run's result, given how its
    /// transaction ended; a write with no result is answered `NotRun`.
    fn answer(self: Box<Self>, outcome: Result<(), &str>);
}

type Write = Box<dyn WriteJob>;

struct Queued<F, R, E> {
    f: F,
    result: Option<Result<R, E>>,
    panicked: bool,
    answer: oneshot::Sender<Result<R, E>>,
}

impl<F, R, E> WriteJob for Queued<F, R, E>
where
    F: FnMut(&mut dyn Tx) -> Result<R, E> + Send,
    R: Send,
    E: From<StoreError> + Send,
{
    fn run(&mut self, tx: &mut PgTx<'_>) -> bool {
        let mut result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(tx)))
            .unwrap_or_else(|_| {
                tracing::error!("a store write panicked; nothing of it was kept");
                self.panicked = true;
                Err(E::from(StoreError::NotRun))
            });
        if tx.failed && result.is_ok() {
            // PostgreSQL ends a transaction whose statement failed, and its
            // COMMIT then rolls back without an error: never answer Ok.
            result = Err(E::from(StoreError::Sql(
                "a statement of the write failed and the write went on; nothing of it was kept".into(),
            )));
        }
        let keep = result.is_ok();
        self.result = Some(result);
        keep
    }

    fn reset(&mut self) {
        if !self.panicked {
            self.result = None;
        }
    }

    fn panicked(&self) -> bool {
        self.panicked
    }

    fn answer(self: Box<Self>, outcome: Result<(), &str>) {
        let result = self.result.unwrap_or_else(|| Err(E::from(StoreError::NotRun)));
        let _ = self.answer.send(crate::settle(result, outcome));
    }
}

#[derive(Clone)]
pub(crate) struct PostgresStore {
    writes: mpsc::Sender<Write>,
    reads: mpsc::Sender<ReadJob>,
    /// This instance's writer connections, as each tells the database
    /// (`sagamesh.writer`): rows a table defaults to one of them are this
    /// instance's. They share a prefix, the instance's id.
    writers: Vec<String>,
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Sql(match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        })
    }
}

impl PostgresStore {
    /// Connects, creates the schema if needed, applies the migrations not
    /// yet applied (one replica at a time) and starts the threads.
    pub(crate) fn open(url: &str, schema: &str, migrations: &[&str]) -> Result<PostgresStore, StoreError> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(StoreError::Open {
                path: schema.to_owned(),
                reason: "a schema name is 1 to 63 lowercase letters, digits or '_'".into(),
            });
        }
        // The connections are made on the writer's thread: the `postgres`
        // client runs its own small runtime, which must not start inside an
        // async worker. The open waits for them, so a bad URL fails it.
        let (opened_tx, opened_rx) = std_mpsc::channel();
        let connector = Connector {
            url: Arc::from(url),
            schema: Arc::from(schema),
        };
        let migrations_owned = migrations.iter().map(|m| (*m).to_owned()).collect::<Vec<_>>();
        let instance = uuid::Uuid::now_v7().simple().to_string();
        let writers: Vec<String> = (0..WRITERS).map(|n| format!("{instance}-{n}")).collect();
        let names = writers.clone();
        let (writes, write_rx) = mpsc::channel::<Write>(QUEUE);
        let write_rx = Arc::new(Mutex::new(write_rx));
        let (reads, read_rx) = mpsc::channel::<ReadJob>(QUEUE);
        let read_rx = Arc::new(Mutex::new(read_rx));
        let thread_name = format!("{schema}-pg");
        std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || {
                let opened = (|| {
                    let mut clients = Vec::new();
                    for name in &names {
                        let mut client = connector.connect(Some(name))?;
                        if clients.is_empty() {
                            migrate(&mut client, &connector.schema, &migrations_owned)?;
                        }
                        clients.push((client, name.clone()));
                    }
                    let readers = (0..READERS)
                        .map(|_| connector.connect(None))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok::<_, StoreError>((clients, readers))
                })();
                match opened {
                    Ok((clients, readers)) => {
                        let _ = opened_tx.send(Ok(()));
                        for (client, name) in clients {
                            let (jobs, connector) = (write_rx.clone(), connector.clone());
                            let _ = std::thread::Builder::new()
                                .name(format!("{thread_name}-writer"))
                                .spawn(move || run_writer(client, &connector, &name, jobs));
                        }
                        for client in readers {
                            let (jobs, connector) = (read_rx.clone(), connector.clone());
                            let _ = std::thread::Builder::new()
                                .name(format!("{thread_name}-reader"))
                                .spawn(move || run_reader(client, &connector, jobs));
                        }
                    }
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Commit(e.to_string()))?;
        opened_rx.recv().map_err(|_| StoreError::Closed)??;
        Ok(PostgresStore {
            writes,
            reads,
            writers,
        })
    }

    pub(crate) fn writers(&self) -> &[String] {
        &self.writers
    }

    /// Runs `f` in a transaction, maybe shared with other writes; `f` may
    /// run more than once, only its last run counts (see [`commit_batch`]).
    pub(crate) async fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnMut(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Write = Box::new(Queued {
            f,
            result: None,
            panicked: false,
            answer,
        });
        crate::hand_over(&self.writes, job, answered).await
    }

    /// PostgreSQL's commit is its sync: a staged write is durable at once.
    pub(crate) async fn write_staged<R, E, F>(&self, f: F) -> Result<(R, Synced), E>
    where
        F: FnMut(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let value = self.write(f).await?;
        let (synced, receiver) = oneshot::channel();
        let _ = synced.send(Ok(()));
        Ok((value, Synced::new(receiver)))
    }

    pub(crate) async fn read<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: ReadJob = Box::new(move |pg| {
            // A panicking read is answered, and its thread lives on.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(pg))).unwrap_or_else(|_| {
                    tracing::error!("a store read panicked");
                    Err(E::from(StoreError::ReadPanicked))
                });
            let _ = answer.send(result);
        });
        crate::hand_over(&self.reads, job, answered).await
    }
}

/// Where a connection string points, for messages and logs: user, hosts
/// and database, never the password. Rebuilt from the driver's own parse,
/// so no way of writing the password can slip through.
fn described(url: &str) -> String {
    let Ok(config) = url.parse::<postgres::Config>() else {
        return "a PostgreSQL connection string that does not parse".to_owned();
    };
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                postgres::config::Host::Unix(path) => path.display().to_string(),
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// Opens a store's connections, and opens one again when PostgreSQL drops
/// it (a restart, a failover, an administrator ending the session): a read
/// that found it closed fails, and so does a write whose commit was under
/// way (it may or may not have committed); the writes that had not reached
/// their commit run again, and the ones queued behind wait, once the
/// thread is connected again.
#[derive(Clone)]
struct Connector {
    url: Arc<str>,
    schema: Arc<str>,
}

/// The first pause before connecting again; it doubles up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

impl Connector {
    /// A connection in the store's schema; a writer's names itself (see
    /// [`PostgresStore::writers`]).
    fn connect(&self, writer: Option<&str>) -> Result<Client, StoreError> {
        let (url, schema) = (&*self.url, &*self.schema);
        let mut client = Client::connect(url, NoTls).map_err(|e| StoreError::Open {
            path: described(url),
            reason: e.to_string(),
        })?;
        // Replicas starting together would race on creating the schema: the
        // same advisory lock as the migrations' serialises them.
        client.batch_execute(&format!(
            "SELECT pg_advisory_lock(hashtext('{schema}'));
             CREATE SCHEMA IF NOT EXISTS {schema};
             SELECT pg_advisory_unlock(hashtext('{schema}'));
             SET search_path TO {schema};
             SET application_name TO 'sagamesh {schema}'"
        ))?;
        if let Some(name) = writer {
            client.batch_execute(&format!("SET sagamesh.writer = '{name}'"))?;
        }
        Ok(client)
    }

    /// Connects again, pausing longer after each failure, until it
    /// connects or the store is closed (`None`).
    fn reconnect<J>(&self, writer: Option<&str>, jobs: &Mutex<mpsc::Receiver<J>>) -> Option<Client> {
        let mut pause = RECONNECT_FIRST;
        loop {
            // Another thread waiting on the queue holds the lock: the store
            // is open.
            let closed = || jobs.try_lock().is_ok_and(|jobs| jobs.is_closed());
            if closed() {
                return None;
            }
            std::thread::sleep(pause);
            // The store may have closed during the pause: connecting would
            // only create its schema again.
            if closed() {
                return None;
            }
            match self.connect(writer) {
                Ok(client) => {
                    tracing::info!(schema = %self.schema, "connected to PostgreSQL again");
                    return Some(client);
                }
                Err(e) => {
                    tracing::warn!(schema = %self.schema, error = %e, "cannot connect to PostgreSQL again yet");
                    pause = (pause * 2).min(RECONNECT_MAX);
                }
            }
        }
    }
}

/// Applies the migrations not yet applied, under an advisory lock so that
/// replicas starting together migrate once.
fn migrate(client: &mut Client, schema: &str, migrations: &[String]) -> Result<(), StoreError> {
    client.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);")?;
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&schema])?;
    let applied: i64 = match tx.query_opt("SELECT version FROM schema_version", &[])? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])?;
            0
        }
    };
    for (version, sql) in migrations.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(sql)?;
        tx.execute("UPDATE schema_version SET version = $1", &[&(version as i64 + 1)])?;
    }
    tx.commit()?;
    Ok(())
}

/// Statements on a PostgreSQL connection, prepared once and reused.
pub(crate) struct PgTx<'c> {
    client: &'c mut Client,
    prepared: &'c mut HashMap<String, Statement>,
    /// Whether a statement failed (which ends the transaction).
    failed: bool,
    /// Whether a statement gave up waiting for a row lock.
    lock_timed_out: bool,
}

impl<'c> PgTx<'c> {
    fn new(client: &'c mut Client, prepared: &'c mut HashMap<String, Statement>) -> PgTx<'c> {
        PgTx {
            client,
            prepared,
            failed: false,
            lock_timed_out: false,
        }
    }

    /// Notes a statement's failure.
    fn note(&mut self, error: Option<&postgres::Error>) {
        if let Some(error) = error {
            self.failed = true;
            self.lock_timed_out |= error.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE);
        }
    }

    fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql);
        self.note(statement.as_ref().err());
        let statement = statement?;
        self.prepared.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

fn parameters(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl Tx for PgTx<'_> {
    fn for_update(&self) -> &'static str {
        " FOR UPDATE"
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let statement = self.statement(sql)?;
        let changed = self.client.execute(&statement, &parameters(params));
        self.note(changed.as_ref().err());
        Ok(changed?)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let statement = self.statement(sql)?;
        let rows = self.client.query(&statement, &parameters(params));
        self.note(rows.as_ref().err());
        let rows = rows?;
        rows.iter()
            .map(|row| {
                let values = row
                    .columns()
                    .iter()
                    .enumerate()
                    .map(|(i, column)| column_value(row, i, column.type_()))
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok(Row::new(values))
            })
            .collect()
    }
}

fn column_value(row: &postgres::Row, i: usize, ty: &Type) -> Result<Value, StoreError> {
    let value = match *ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map(|v| Value::Int(v.into())),
        Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map(|v| Value::Int(v.into())),
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(|v| Value::Int(v.into())),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        }
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
        _ => {
            return Err(StoreError::Sql(format!(
                "column {i} has type {ty}, which the stores do not use"
            )));
        }
    };
    Ok(value.unwrap_or(Value::Null))
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Value::Text(t) => t.to_sql(ty, out),
            Value::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Most writes one transaction takes.
const MAX_BATCH: usize = 64;

/// How long a batch waits for a row lock before it gives up, rolls back
/// and tries again without a limit. Two batches (of this store's writers,
/// or of replicas) may lock the same rows in opposite orders (user X then
/// Y against Y then X); one of them then gives up well before PostgreSQL's
/// deadlock check (`deadlock_timeout`, a second by default) would end it,
/// and the other goes on meanwhile. A batch that only waited behind a busy
/// row waits for it on its second try.
const BATCH_BEGIN: &str = "BEGIN; SET LOCAL lock_timeout = '100ms'";

/// Takes the writes waiting for this store and commits them, many at a
/// time (see [`commit_batch`]).
fn run_writer(
    mut client: Client,
    connector: &Connector,
    name: &str,
    jobs: Arc<Mutex<mpsc::Receiver<Write>>>,
) {
    let mut prepared = HashMap::new();
    let mut batch: Vec<Write> = Vec::with_capacity(MAX_BATCH);
    loop {
        if batch.is_empty() {
            // One writer waits for the queue at a time; the lock is released
            // before the writes run.
            let next = jobs
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .blocking_recv();
            let Some(first) = next else { return };
            batch.push(first);
        }
        // What else waits, unless the other writer is waiting on the queue:
        // then it takes the next write itself.
        if let Ok(mut queue) = jobs.try_lock() {
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        // What is left in `batch` never reached a commit before the
        // connection closed: it runs once connected again.
        commit_batch(&mut client, &mut prepared, &mut batch);
        if client.is_closed() {
            tracing::error!(schema = %connector.schema, "the PostgreSQL connection closed; connecting again");
            let Some(again) = connector.reconnect(Some(name), &jobs) else {
                return;
            };
            client = again;
            // Statements are prepared per connection.
            prepared.clear();
        }
    }
}

/// How a transaction of writes ended.
#[derive(Debug, PartialEq)]
enum Ended {
    Committed,
    /// Rolled back: a write failed or asked not to be kept.
    RolledBack,
    /// Rolled back: a row lock took longer than the batch's timeout.
    LockTimedOut,
    /// The connection closed before the commit: nothing was committed.
    LostBeforeCommit,
    /// The commit failed, and the connection may be gone with it: the
    /// writes may or may not be committed.
    CommitFailed(String),
}

/// Commits the writes in one transaction (sharing its round trips and its
/// commit) and answers them. When any of them fails or asks not to be
/// kept, the transaction is rolled back and each write runs again alone,
/// so a failed write rolls back only itself. Writes that never reached a
/// commit before the connection closed are left in `batch`.
fn commit_batch(client: &mut Client, prepared: &mut HashMap<String, Statement>, batch: &mut Vec<Write>) {
    if batch.len() > 1 {
        let mut ended = commit_together(client, prepared, batch, BATCH_BEGIN);
        if ended == Ended::LockTimedOut {
            tracing::debug!(
                writes = batch.len(),
                "a batch waited too long for a row lock; trying it again"
            );
            ended = commit_together(client, prepared, batch, "BEGIN");
        }
        match ended {
            Ended::Committed => {
                for job in batch.drain(..) {
                    job.answer(Ok(()));
                }
                return;
            }
            Ended::CommitFailed(e) => {
                tracing::error!(error = %e, writes = batch.len(), "store commit failed");
                for job in batch.drain(..) {
                    job.answer(Err(&e));
                }
                return;
            }
            Ended::LostBeforeCommit => {
                batch.iter_mut().for_each(|job| job.reset());
                return;
            }
            Ended::RolledBack | Ended::LockTimedOut => {
                tracing::debug!(writes = batch.len(), "a write of a batch failed; each runs alone");
                batch.iter_mut().for_each(|job| job.reset());
            }
        }
    }
    let mut alone = std::mem::take(batch).into_iter();
    while let Some(mut job) = alone.next() {
        // A write that panicked is answered with its panic, not run again.
        if job.panicked() {
            job.answer(Ok(()));
            continue;
        }
        match commit_together(client, prepared, std::slice::from_mut(&mut job), "BEGIN") {
            // Its own result says whether it was kept.
            Ended::Committed | Ended::RolledBack | Ended::LockTimedOut => job.answer(Ok(())),
            Ended::CommitFailed(e) => {
                tracing::error!(error = %e, "store commit failed");
                job.answer(Err(&e));
            }
            Ended::LostBeforeCommit => {
                job.reset();
                batch.push(job);
                batch.extend(alone);
                return;
            }
        }
    }
}

/// Runs the writes in one transaction begun with `begin`, and commits it
/// if every write is kept.
fn commit_together(
    client: &mut Client,
    prepared: &mut HashMap<String, Statement>,
    batch: &mut [Write],
    begin: &str,
) -> Ended {
    let lost_or = |client: &Client, ended: Ended| {
        if client.is_closed() {
            Ended::LostBeforeCommit
        } else {
            ended
        }
    };
    if client.batch_execute(begin).is_err() {
        let _ = client.batch_execute("ROLLBACK");
        return lost_or(client, Ended::RolledBack);
    }
    for job in batch.iter_mut() {
        let mut tx = PgTx::new(client, prepared);
        let kept = job.run(&mut tx);
        let lock_timed_out = tx.lock_timed_out;
        if !kept {
            let _ = client.batch_execute("ROLLBACK");
            let ended = if lock_timed_out {
                Ended::LockTimedOut
            } else {
                Ended::RolledBack
            };
            return lost_or(client, ended);
        }
    }
    match client.batch_execute("COMMIT") {
        Ok(()) => Ended::Committed,
        Err(e) => Ended::CommitFailed(e.to_string()),
    }
}

fn run_reader(mut client: Client, connector: &Connector, jobs: Arc<Mutex<mpsc::Receiver<ReadJob>>>) {
    let mut prepared = HashMap::new();
    loop {
        let next = jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .blocking_recv();
        let Some(job) = next else { return };
        job(&mut PgTx::new(&mut client, &mut prepared));
        if client.is_closed() {
            tracing::error!(schema = %connector.schema, "the PostgreSQL connection closed; connecting again");
            let Some(again) = connector.reconnect(None, &jobs) else {
                return;
            };
            client = again;
            prepared.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::values;

    /// A connection to the PostgreSQL server on this machine
    /// (`SAGAMESH_TEST_POSTGRES`), in a schema of the test's own holding a
    /// table `t (id, v)`. `None`, with a reason, when there is no server,
    /// except in CI.
    fn test_connection(test: &str) -> Option<(Client, Connector)> {
        let url = std::env::var("SAGAMESH_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let connector = Connector {
            url: Arc::from(url.as_str()),
            schema: Arc::from(format!("{test}_{}", std::process::id()).as_str()),
        };
        match connector.connect(Some("test")) {
            Ok(mut client) => {
                client
                    .batch_execute("CREATE TABLE t (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")
                    .unwrap();
                Some((client, connector))
            }
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: no PostgreSQL ({e})");
                None
            }
            Err(e) => panic!("PostgreSQL must run in CI: {e}"),
        }
    }

    fn drop_schema(client: &mut Client, connector: &Connector) {
        client
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", connector.schema))
            .unwrap();
    }

    type Answer<R> = oneshot::Receiver<Result<R, StoreError>>;

    fn write<R: Send + 'static>(
        f: impl FnMut(&mut dyn Tx) -> Result<R, StoreError> + Send + 'static,
    ) -> (Write, Answer<R>) {
        let (answer, answered) = oneshot::channel();
        let job: Write = Box::new(Queued {
            f,
            result: None,
            panicked: false,
            answer,
        });
        (job, answered)
    }

    /// The first column of `sql`'s rows, an integer.
    fn integers(client: &mut Client, sql: &str) -> Vec<i64> {
        client
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    fn ids(client: &mut Client) -> Vec<i64> {
        integers(client, "SELECT id FROM t ORDER BY id")
    }

    /// Inserts `id`, counting its runs, and returns its transaction's id.
    fn insert(id: i64, runs: &Arc<AtomicUsize>) -> (Write, Answer<i64>) {
        let runs = runs.clone();
        write(move |tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            tx.execute("INSERT INTO t (id, v) VALUES ($1, 0)", &values![id])?;
            tx.query("SELECT txid_current()", &[])?[0].int(0)
        })
    }

    #[test]
    fn the_writes_of_a_batch_share_one_transaction() {
        let Some((mut client, connector)) = test_connection("store_batch_shared") else {
            return;
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let (first, first_answer) = insert(1, &runs);
        let (second, second_answer) = insert(2, &runs);
        commit_batch(&mut client, &mut HashMap::new(), &mut vec![first, second]);
        let first_tx = first_answer.blocking_recv().unwrap().unwrap();
        assert_eq!(second_answer.blocking_recv().unwrap().unwrap(), first_tx);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "each write ran once");
        assert_eq!(ids(&mut client), vec![1, 2]);
        drop_schema(&mut client, &connector);
    }

    #[test]
    fn a_write_that_fails_in_a_batch_rolls_back_alone() {
        let Some((mut client, connector)) = test_connection("store_batch_fail") else {
            return;
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let (first, first_answer) = insert(1, &runs);
        let (failing, failing_answer) = write(|tx| {
            tx.execute("INSERT INTO t (id, v) VALUES (2, 0)", &[])?;
            Err::<(), _>(StoreError::Sql("refused".into()))
        });
        let (last, last_answer) = insert(3, &runs);
        commit_batch(&mut client, &mut HashMap::new(), &mut vec![first, failing, last]);
        let first_tx = first_answer.blocking_recv().unwrap().unwrap();
        assert!(
            matches!(failing_answer.blocking_recv().unwrap(), Err(StoreError::Sql(reason)) if reason == "refused")
        );
        let last_tx = last_answer.blocking_recv().unwrap().unwrap();
        assert_ne!(first_tx, last_tx, "after the failure, each write ran alone");
        // The first ran in the batch and again alone; the last only alone.
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(ids(&mut client), vec![1, 3]);
        drop_schema(&mut client, &connector);
    }

    #[test]
    fn a_write_that_goes_on_after_a_failed_statement_is_not_answered_ok() {
        let Some((mut client, connector)) = test_connection("store_batch_swallowed") else {
            return;
        };
        let (swallowing, answer) = write(|tx| {
            tx.execute("INSERT INTO t (id, v) VALUES (1, 0)", &[])?;
            let _ = tx.execute("INSERT INTO t (id, v) VALUES (1, 0)", &[]);
            Ok(())
        });
        commit_batch(&mut client, &mut HashMap::new(), &mut vec![swallowing]);
        assert!(answer.blocking_recv().unwrap().is_err());
        assert_eq!(ids(&mut client), Vec::<i64>::new());
        drop_schema(&mut client, &connector);
    }

    /// A batch that waits behind a row another transaction holds for
    /// longer than its lock timeout tries again without one: its writes
    /// still share one transaction.
    #[test]
    fn a_batch_behind_a_busy_row_waits_for_it_on_its_second_try() {
        let Some((mut client, connector)) = test_connection("store_batch_busy") else {
            return;
        };
        client
            .batch_execute("INSERT INTO t (id, v) VALUES (1, 0)")
            .unwrap();
        let (held, released) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let mut holder = connector.connect(Some("holder")).unwrap();
        let holding = {
            let (held, released) = (held.clone(), released.clone());
            std::thread::spawn(move || {
                holder
                    .batch_execute("BEGIN; UPDATE t SET v = v + 10 WHERE id = 1")
                    .unwrap();
                held.wait();
                released.wait();
                // Longer than the lock timeout.
                std::thread::sleep(Duration::from_millis(300));
                holder.batch_execute("COMMIT").unwrap();
            })
        };
        held.wait();
        let runs = Arc::new(AtomicUsize::new(0));
        let update_runs = runs.clone();
        let (update, update_answer) = write(move |tx| {
            update_runs.fetch_add(1, Ordering::SeqCst);
            tx.execute("UPDATE t SET v = v + 1 WHERE id = 1", &[])?;
            tx.query("SELECT txid_current()", &[])?[0].int(0)
        });
        let (second, second_answer) = insert(2, &runs);
        released.wait();
        commit_batch(&mut client, &mut HashMap::new(), &mut vec![update, second]);
        holding.join().unwrap();
        let update_tx = update_answer.blocking_recv().unwrap().unwrap();
        assert_eq!(
            second_answer.blocking_recv().unwrap().unwrap(),
            update_tx,
            "still one transaction"
        );
        // The update timed out once and ran again; the insert ran once.
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(integers(&mut client, "SELECT v FROM t WHERE id = 1"), vec![11]);
        drop_schema(&mut client, &connector);
    }

    /// The connection closes in the middle of a batch: nothing is
    /// answered, the writes stay in the batch, and they commit on the next
    /// connection.
    #[test]
    fn writes_whose_connection_closed_before_their_commit_run_again() {
        let Some((mut client, connector)) = test_connection("store_batch_lost") else {
            return;
        };
        let first_run = Arc::new(AtomicBool::new(true));
        let (ending, ending_answer) = write(move |tx| {
            tx.execute("INSERT INTO t (id, v) VALUES (1, 0)", &[])?;
            if first_run.swap(false, Ordering::SeqCst) {
                // PostgreSQL ends this session, as a restart would.
                let _ = tx.query("SELECT pg_terminate_backend(pg_backend_pid())", &[]);
            }
            Ok(())
        });
        let runs = Arc::new(AtomicUsize::new(0));
        let (second, mut second_answer) = insert(2, &runs);
        let mut batch = vec![ending, second];
        commit_batch(&mut client, &mut HashMap::new(), &mut batch);
        assert!(client.is_closed());
        assert_eq!(batch.len(), 2, "both writes wait for the next connection");
        assert!(second_answer.try_recv().is_err(), "not answered yet");
        let mut again = connector.connect(Some("again")).unwrap();
        commit_batch(&mut again, &mut HashMap::new(), &mut batch);
        assert!(batch.is_empty());
        ending_answer.blocking_recv().unwrap().unwrap();
        second_answer.blocking_recv().unwrap().unwrap();
        assert_eq!(ids(&mut again), vec![1, 2]);
        drop_schema(&mut again, &connector);
    }

    /// Two connections' batches update two rows in opposite orders and
    /// meet in the middle (a deadlock); one gives up at its lock timeout
    /// and tries again behind the other, and every update lands once.
    #[test]
    fn batches_that_lock_rows_in_opposite_orders_do_not_deadlock() {
        let Some((mut client, connector)) = test_connection("store_batch_deadlock") else {
            return;
        };
        client
            .batch_execute("INSERT INTO t (id, v) VALUES (1, 0), (2, 0)")
            .unwrap();
        // Each batch's first write waits, on its first run only, until the
        // other's first write holds its row.
        let both_hold_one = Arc::new(Barrier::new(2));
        let batch = |first_row: i64, second_row: i64| {
            let (barrier, first_run) = (both_hold_one.clone(), Arc::new(AtomicBool::new(true)));
            let (first, first_answer) = write(move |tx| {
                let changed = tx.execute("UPDATE t SET v = v + 1 WHERE id = $1", &values![first_row])?;
                if first_run.swap(false, Ordering::SeqCst) {
                    barrier.wait();
                }
                Ok(changed)
            });
            let (second, second_answer) =
                write(move |tx| tx.execute("UPDATE t SET v = v + 1 WHERE id = $1", &values![second_row]));
            (vec![first, second], [first_answer, second_answer])
        };
        let (mut forward, forward_answers) = batch(1, 2);
        let (mut backward, backward_answers) = batch(2, 1);
        let mut other = connector.connect(Some("other")).unwrap();
        let backward_done = std::thread::spawn(move || {
            commit_batch(&mut other, &mut HashMap::new(), &mut backward);
        });
        commit_batch(&mut client, &mut HashMap::new(), &mut forward);
        backward_done.join().unwrap();
        for answer in forward_answers.into_iter().chain(backward_answers) {
            assert_eq!(answer.blocking_recv().unwrap().unwrap(), 1);
        }
        assert_eq!(
            integers(&mut client, "SELECT v FROM t ORDER BY id"),
            vec![2, 2],
            "every update landed once"
        );
        drop_schema(&mut client, &connector);
    }

    #[test]
    fn a_connection_string_is_described_without_its_password() {
        for (url, expected) in [
            (
                "postgres://app:s3cret@db.example:5432/test?sslmode=disable",
                "postgres://app@db.example:5432/test",
            ),
            (
                "postgres://app:Zk/9q+Xw==@db/sagamesh",
                "postgres://app@db:5432/sagamesh",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/test",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            (
                "host=db user=app password = s3cret dbname=test",
                "postgres://app@db:5432/test",
            ),
            (
                "host=db user=app password='s3 cret' dbname=test",
                "postgres://app@db:5432/test",
            ),
            (
                "postgres://db/test?user=app&password=s3cret&sslmode=disable",
                "postgres://app@db:5432/test",
            ),
        ] {
            let description = described(url);
            assert_eq!(description, expected, "{url}");
            assert!(
                !description.contains("s3") && !description.contains("Zk"),
                "{description}"
            );
        }
    }
}
