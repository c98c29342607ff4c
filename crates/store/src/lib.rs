//! The store every sagamesh service keeps its state in, behind one small
//! interface so that the domain code does not know which engine runs it.
//!
//! A service hands [`Store::write`] a closure that runs its statements on a
//! [`Tx`]; the closure's statements commit together, or, when it returns
//! `Err`, roll back alone. Statements are plain SQL with numbered
//! parameters (`$1`, `$2`, ...) and the few types the services need
//! ([`Value`]). Two engines run them ([`Database`]): SQLite, the embedded
//! default (one file per service, group commit, fsync before `write`
//! returns), and PostgreSQL, for replicas sharing their state (a schema per
//! service). A service gives its migrations once per engine ([`Schema`]).
//!
//! A caller whose result is already backed by a durable copy elsewhere may
//! act before the fsync ([`Store::write_staged`]): the router delivers an
//! event while its fsync runs, because the event's publisher keeps its own
//! durable copy until the router confirms the sync.

mod postgres;
mod prepared;
mod sched;
mod sqlite;
mod synced;
mod value;

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::sqlite::SyncWhen;

pub use value::{Row, Value};

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
    Sql(String),
    #[error("column {column} holds {found}, not {expected}")]
    Column {
        column: usize,
        expected: &'static str,
        found: &'static str,
    },
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the store is closed")]
    Closed,
    #[error(
        "the write did not run to the end (it panicked, or another write broke the transaction it shared; \
         see the log): nothing of it was kept"
    )]
    NotRun,
    #[error("a read failed unexpectedly (it panicked)")]
    ReadPanicked,
    #[error("could not open the store at {path}: {reason}")]
    Open { path: String, reason: String },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(e.to_string())
    }
}

/// The statements of one write or read, whatever the engine.
pub trait Tx {
    /// Runs a statement; returns how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError>;

    /// Runs a query; returns its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError>;

    /// Runs a query; returns its first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// What to end a `SELECT` with so that it locks the rows it reads until
    /// the write commits, where other instances may write them concurrently
    /// (` FOR UPDATE` on PostgreSQL; nothing on SQLite, whose one writer
    /// serialises every write anyway).
    fn for_update(&self) -> &'static str {
        ""
    }

    /// The rowid of the last row this connection inserted, where one
    /// connection writes and rowids therefore follow the commit order
    /// (SQLite); `None` where writers interleave (PostgreSQL). Meaningful
    /// right after an `INSERT` that inserted rows: one that inserted none
    /// leaves an earlier write's value.
    fn last_rowid(&self) -> Option<i64> {
        None
    }
}

/// Statement parameters: `&values![user_id, amount]`.
#[macro_export]
macro_rules! values {
    ($($value:expr),* $(,)?) => {
        [$($crate::Value::from($value)),*]
    };
}

/// Resolves once a staged write is as durable as the store promises.
#[must_use = "a staged write is not durable until `durable` resolves"]
pub struct Synced(oneshot::Receiver<Result<(), String>>);

impl Synced {
    fn new(receiver: oneshot::Receiver<Result<(), String>>) -> Synced {
        Synced(receiver)
    }

    pub async fn durable(self) -> Result<(), StoreError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Commit(e)),
            Err(_) => Err(StoreError::Closed),
        }
    }
}

/// Queues `job` for an engine's thread and waits for the answer it sends
/// on `answered`; a thread that is gone answers `StoreError::Closed`.
pub(crate) async fn hand_over<J, T, E: From<StoreError>>(
    queue: &tokio::sync::mpsc::Sender<J>,
    job: J,
    answered: oneshot::Receiver<Result<T, E>>,
) -> Result<T, E> {
    queue.send(job).await.map_err(|_| E::from(StoreError::Closed))?;
    answered.await.map_err(|_| E::from(StoreError::Closed))?
}

/// A job's own result combined with the outcome of its commit.
pub(crate) fn settle<R, E: From<StoreError>>(
    result: Result<R, E>,
    outcome: Result<(), &str>,
) -> Result<R, E> {
    match (result, outcome) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) => Err(E::from(StoreError::Commit(e.to_owned()))),
        (Err(e), _) => Err(e),
    }
}

/// Where the services keep their stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file per service, `<dir>/<service>.db`.
    Embedded { dir: PathBuf, durability: Durability },
    /// One PostgreSQL database (`postgres://...`); each service in the
    /// schema `<prefix>_<service>`.
    Postgres { url: String, schema_prefix: String },
}

/// A service's migrations, in order, once per engine.
pub struct Schema {
    pub sqlite: &'static [&'static str],
    pub postgres: &'static [&'static str],
}

/// A handle to one service's store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    engine: Engine,
}

#[derive(Clone)]
enum Engine {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PostgresStore),
}

impl Store {
    /// Opens (or creates) the SQLite file, applies the migrations not yet
    /// applied and starts its writer.
    pub fn open(path: &Path, durability: Durability, migrations: &[&str]) -> Result<Store, StoreError> {
        Ok(Store {
            engine: Engine::Sqlite(sqlite::SqliteStore::open(path, durability, migrations)?),
        })
    }

    /// Opens a service's store in `database`, migrated to `schema`.
    pub fn open_service(database: &Database, service: &str, schema: &Schema) -> Result<Store, StoreError> {
        match database {
            Database::Embedded { dir, durability } => {
                Store::open(&dir.join(format!("{service}.db")), *durability, schema.sqlite)
            }
            Database::Postgres { url, schema_prefix } => {
                let name = format!("{schema_prefix}_{service}").replace('-', "_");
                Ok(Store {
                    engine: Engine::Postgres(postgres::PostgresStore::open(url, &name, schema.postgres)?),
                })
            }
        }
    }

    /// Whether other instances may write the same tables (PostgreSQL), so
    /// state can change without this instance writing it.
    pub fn shared(&self) -> bool {
        matches!(self.engine, Engine::Postgres(_))
    }

    /// This instance's writer connections: rows a table defaults to the
    /// writer (see the outbox) carry one of them, and one connection's rows
    /// commit in the order it wrote them. On SQLite one connection writes,
    /// named "".
    pub fn writers(&self) -> Vec<String> {
        match &self.engine {
            Engine::Sqlite(_) => vec![String::new()],
            Engine::Postgres(engine) => engine.writers().to_vec(),
        }
    }

    /// Runs `f` in a write transaction shared with other callers. Returns
    /// once the transaction is durable. An `Err` from `f` rolls back only
    /// what `f` did. `f` may run more than once, only its last run counts:
    /// it must do nothing but run its statements and compute its result.
    /// Its statements change rows, not the schema (migrations do that): on
    /// SQLite a failed `f` that changed no rows is not rolled back.
    pub async fn write<R, E, F>(&self, mut f: F) -> Result<R, E>
    where
        F: FnMut(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        match &self.engine {
            Engine::Sqlite(engine) => engine.write(move |conn| f(&mut SqliteTx::Writer(conn))).await,
            Engine::Postgres(engine) => engine.write(f).await,
        }
    }

    /// Like [`Store::write`], but returns as soon as the transaction is
    /// committed, before its fsync: its effects are visible and survive the
    /// process dying. The returned [`Synced`] resolves once it also survives
    /// the machine. Use it only where whatever acts on the result early can
    /// be redone from a durable copy kept elsewhere.
    pub async fn write_staged<R, E, F>(&self, f: F) -> Result<(R, Synced), E>
    where
        F: FnMut(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.staged(f, SyncWhen::Now).await
    }

    /// Like [`Store::write_staged`], for a stream of writes that need not
    /// each be durable at once: the write asks for no fsync of its own. On
    /// SQLite its commit is synced with the next write that asks for one,
    /// when a [`Store::read_durable`] waits for it, or within a few
    /// milliseconds, so that such writes share fsyncs. (A PostgreSQL commit
    /// is durable when it returns.)
    pub async fn write_deferred<R, E, F>(&self, f: F) -> Result<(R, Synced), E>
    where
        F: FnMut(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.staged(f, SyncWhen::Deferred).await
    }

    /// A staged write whose commit is synced `when`.
    async fn staged<R, E, F>(&self, mut f: F, when: SyncWhen) -> Result<(R, Synced), E>
    where
        F: FnMut(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        match &self.engine {
            Engine::Sqlite(engine) => {
                engine
                    .write_staged(move |conn| f(&mut SqliteTx::Writer(conn)), when)
                    .await
            }
            Engine::Postgres(engine) => engine.write_staged(f).await,
        }
    }

    /// Runs `f` on a read connection, which sees the last commit (keep
    /// reads short: a page, not a scan).
    pub async fn read<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        match &self.engine {
            Engine::Sqlite(engine) => engine.read(move |conn| f(&mut SqliteTx::Reader(conn))).await,
            Engine::Postgres(engine) => engine.read(f).await,
        }
    }

    /// Like [`Store::read`], but returns only once everything the read saw
    /// is durable, for a caller that passes it on (the outbox relay). A
    /// SQLite read can see commits whose fsync is still running; this waits
    /// for it, and fails for good once an fsync has failed. A PostgreSQL
    /// commit is durable when it is seen (with its default
    /// `synchronous_commit = on`).
    pub async fn read_durable<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        match &self.engine {
            Engine::Sqlite(engine) => {
                engine
                    .read_durable(move |conn| f(&mut SqliteTx::Reader(conn)))
                    .await
            }
            Engine::Postgres(engine) => engine.read(f).await,
        }
    }
}

/// Statements on a SQLite connection, which takes `$1`-style parameters
/// as they are written (see [`bind`]): a store's writer, which keeps its
/// statements prepared, or a pooled reader, which uses rusqlite's cache.
enum SqliteTx<'a, 'c> {
    Writer(&'a mut prepared::Prepared<'c>),
    Reader(&'c Connection),
}

impl<'c> SqliteTx<'_, 'c> {
    fn statement(&mut self, sql: &str) -> Result<prepared::PreparedStatement<'_, 'c>, StoreError> {
        Ok(match self {
            SqliteTx::Writer(prepared) => prepared.statement(sql)?,
            SqliteTx::Reader(conn) => prepared::PreparedStatement::Cached(conn.prepare_cached(sql)?),
        })
    }
}

impl Tx for SqliteTx<'_, '_> {
    fn last_rowid(&self) -> Option<i64> {
        let conn: &Connection = match self {
            SqliteTx::Writer(prepared) => prepared,
            SqliteTx::Reader(conn) => conn,
        };
        Some(conn.last_insert_rowid())
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let mut statement = self.statement(sql)?;
        statement.bind(params)?;
        Ok(statement.raw_execute()? as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let mut statement = self.statement(sql)?;
        statement.bind(params)?;
        let columns = statement.column_count();
        let mut rows = statement.raw_query();
        let mut found = Vec::new();
        while let Some(row) = rows.next()? {
            let values = (0..columns)
                .map(|i| Value::from_sqlite(row.get_ref(i)?))
                .collect::<Result<Vec<_>, StoreError>>()?;
            found.push(Row::new(values));
        }
        Ok(found)
    }
}

/// Binds `params` to a statement's `$N` parameters. SQLite reads `$1` as a
/// parameter named "$1" and numbers parameters in order of first
/// appearance, so each is bound by its name rather than its position; the
/// statement text needs no rewriting and is cached as written. `numbers`
/// are the `$N` of each parameter when the caller kept them (see
/// [`parameter_number`]); otherwise they are read from the statement.
fn bind(
    statement: &mut rusqlite::Statement<'_>,
    numbers: Option<&[Option<usize>]>,
    params: &[Value],
) -> Result<(), StoreError> {
    for index in 1..=statement.parameter_count() {
        let number = match numbers {
            Some(numbers) => numbers.get(index - 1).copied().flatten(),
            None => parameter_number(statement, index),
        };
        let number = number
            .filter(|number| (1..=params.len()).contains(number))
            .ok_or_else(|| {
                StoreError::Sql(format!(
                    "parameter {index} of the statement is not one of $1..${}",
                    params.len()
                ))
            })?;
        statement.raw_bind_parameter(index, &params[number - 1])?;
    }
    Ok(())
}

/// The N of the statement's parameter at `index` (from 1) when it is
/// named `$N`.
fn parameter_number(statement: &rusqlite::Statement<'_>, index: usize) -> Option<usize> {
    statement
        .parameter_name(index)
        .and_then(|name| name.strip_prefix('$'))
        .and_then(|number| number.parse::<usize>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_bind_by_number_in_any_order() {
        let conn = Connection::open_in_memory().unwrap();
        let mut kept = prepared::Prepared::new(&conn);
        // A reader reads the numbers at each bind; a writer keeps them, so
        // the second round binds from what the first one kept.
        for round in 0..2 {
            for tx in [&mut SqliteTx::Reader(&conn), &mut SqliteTx::Writer(&mut kept)] {
                let rows = tx
                    .query("SELECT $2, $1, $2 || '$1'", &values!["first", "second"])
                    .unwrap();
                assert_eq!(rows[0].string(0).unwrap(), "second", "round {round}");
                assert_eq!(rows[0].string(1).unwrap(), "first");
                assert_eq!(rows[0].string(2).unwrap(), "second$1");
                let missing = tx.query("SELECT $3", &values!["only one"]);
                assert!(matches!(missing, Err(StoreError::Sql(message)) if message.contains("$1..$1")));
                let unnamed = tx.query("SELECT ?", &values!["one"]);
                assert!(matches!(unnamed, Err(StoreError::Sql(message)) if message.contains("parameter 1")));
            }
        }
    }

    const SCHEMA: Schema = Schema {
        sqlite: &["CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, body BLOB, n INTEGER)"],
        postgres: &["CREATE TABLE t (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, body BYTEA, n BIGINT)"],
    };

    #[tokio::test]
    async fn statements_run_and_roll_back_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::Embedded {
            dir: dir.path().to_owned(),
            durability: Durability::Machine,
        };
        statements_run_and_roll_back(Store::open_service(&database, "t", &SCHEMA).unwrap()).await;
    }

    /// A store on the PostgreSQL server on this machine
    /// (`SAGAMESH_TEST_POSTGRES`, default the `test` database on 127.0.0.1),
    /// in a schema of this test's own (`<test>_<pid>_t`), and the server's
    /// URL. `None`, with a reason, when there is no server, except in CI.
    fn postgres_store(test: &str) -> Option<(Store, String, String)> {
        let url = std::env::var("SAGAMESH_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let prefix = format!("{test}_{}", std::process::id());
        let database = Database::Postgres {
            url: url.clone(),
            schema_prefix: prefix.clone(),
        };
        match Store::open_service(&database, "t", &SCHEMA) {
            Ok(store) => Some((store, url, format!("{prefix}_t"))),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: no PostgreSQL ({e})");
                None
            }
            Err(e) => panic!("PostgreSQL must run in CI: {e}"),
        }
    }

    async fn drop_schema(store: &Store, schema: String) {
        store
            .write(move |tx| tx.execute(&format!("DROP SCHEMA {schema} CASCADE"), &[]))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn statements_run_and_roll_back_on_postgres() {
        let Some((store, _, schema)) = postgres_store("store_test") else {
            return;
        };
        statements_run_and_roll_back(store.clone()).await;
        drop_schema(&store, schema).await;
    }

    /// PostgreSQL ends every session of the store (as a restart or a
    /// failover would): the writes and reads that find their connection
    /// closed fail, and the store connects again and serves the next ones.
    /// Runs `sql` on a connection of its own, returning the rows it
    /// changed or, for a `SELECT`, returned.
    async fn admin(url: &str, sql: &'static str, application: &str) -> u64 {
        let (url, application) = (url.to_owned(), application.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            admin.execute(sql, &[&application]).unwrap()
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_store_connects_again_when_its_sessions_end() {
        let Some((store, url, schema)) = postgres_store("store_reconnect") else {
            return;
        };
        let insert = |name: &'static str| {
            move |tx: &mut dyn Tx| tx.execute("INSERT INTO t (name) VALUES ($1)", &values![name])
        };
        store.write(insert("before")).await.unwrap();

        let application = format!("sagamesh {schema}");
        let sessions = postgres::WRITERS + 2;
        let ended = admin(
            &url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &application,
        )
        .await;
        assert_eq!(ended as usize, sessions, "every writer and reader session ended");

        // Each thread's next job finds its session gone and fails; the
        // thread then connects again. Jobs go to whichever thread is free,
        // so keep sending them until every session is back.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let wrote = store.write(insert("after")).await;
            let read = store
                .read(|tx| tx.query("SELECT name FROM t ORDER BY id", &[]))
                .await;
            let connected = admin(
                &url,
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &application,
            )
            .await;
            if connected as usize == sessions {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{connected} of {sessions} sessions back: {wrote:?} {read:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Every thread is connected: every job is served, and what was
        // written before and after the sessions ended is there.
        store
            .write(insert("after"))
            .await
            .expect("every writer serves again");
        for _ in 0..8 {
            let rows = store
                .read(|tx| tx.query("SELECT name FROM t ORDER BY id", &[]))
                .await
                .expect("every reader is connected again");
            let names: Vec<String> = rows.iter().filter_map(|row| row.string(0).ok()).collect();
            assert_eq!(names.first().map(String::as_str), Some("before"));
            assert!(names.iter().any(|name| name == "after"), "{names:?}");
        }
        // No thread is connecting any more, so none creates the schema again
        // after it is dropped.
        drop_schema(&store, schema).await;
    }

    async fn statements_run_and_roll_back(store: Store) {
        let id = store
            .write(|tx| {
                let row = tx.query_opt(
                    "INSERT INTO t (name, body, n) VALUES ($1, $2, $3) RETURNING id",
                    &values!["a", vec![1u8, 2], None::<i64>],
                )?;
                row.expect("a returned id").int(0)
            })
            .await
            .unwrap();
        let failed: Result<(), StoreError> = store
            .write(|tx| {
                tx.execute("INSERT INTO t (name) VALUES ($1)", &values!["lost"])?;
                Err(StoreError::Commit("refused".into()))
            })
            .await;
        assert!(failed.is_err());
        let rows = store
            .read(|tx| tx.query("SELECT id, name, body, n FROM t ORDER BY id", &[]))
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "the failed write rolled back");
        assert_eq!(rows[0].int(0).unwrap(), id);
        assert_eq!(rows[0].string(1).unwrap(), "a");
        assert_eq!(rows[0].blob(2).unwrap(), &[1, 2]);
        assert_eq!(rows[0].opt_int(3).unwrap(), None);
        assert!(matches!(
            rows[0].int(1),
            Err(StoreError::Column { column: 1, .. })
        ));
    }
}
