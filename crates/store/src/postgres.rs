//! The PostgreSQL engine, for services that share their state among
//! replicas: a service's tables live in a schema of its own, so several
//! services (or test runs) share one database.
//!
//! Like the SQLite engine it runs writes on threads of its own, answered
//! after the commit (PostgreSQL's own commit is durable, so a staged write
//! is answered then too), but each write in a transaction of its own (see
//! [`run_writer`]). There are [`WRITERS`] writer threads, each with its connection, so
//! commits overlap and PostgreSQL shares WAL flushes among them, and
//! [`READERS`] reader threads. The threads use the
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

type Job = Box<dyn FnOnce(&mut PgTx<'_>) -> Finish + Send>;
type Completion = Box<dyn FnOnce(Result<(), &str>) + Send>;

struct Finish {
    keep: bool,
    done: Completion,
}

#[derive(Clone)]
pub(crate) struct PostgresStore {
    writes: mpsc::Sender<Job>,
    reads: mpsc::Sender<Job>,
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
        let (writes, write_rx) = mpsc::channel::<Job>(QUEUE);
        let write_rx = Arc::new(Mutex::new(write_rx));
        let (reads, read_rx) = mpsc::channel::<Job>(QUEUE);
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

    pub(crate) async fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        run(&self.writes, f, || StoreError::NotRun).await
    }

    /// PostgreSQL's commit is its sync: a staged write is durable at once.
    pub(crate) async fn write_staged<R, E, F>(&self, f: F) -> Result<(R, Synced), E>
    where
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let value = run(&self.writes, f, || StoreError::NotRun).await?;
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
        run(&self.reads, f, || StoreError::ReadPanicked).await
    }
}

/// Queues `f` for a writer or a reader thread. A job that panics is not
/// kept and is answered `panicked` (the thread lives on).
async fn run<R, E, F>(queue: &mpsc::Sender<Job>, f: F, panicked: fn() -> StoreError) -> Result<R, E>
where
    F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
    R: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move |pg| {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(pg))).unwrap_or_else(|_| {
            tracing::error!("a store job panicked; nothing of it was kept");
            Err(E::from(panicked()))
        });
        let keep = result.is_ok();
        let done: Completion = Box::new(move |outcome| {
            let _ = tx.send(crate::settle(result, outcome));
        });
        Finish { keep, done }
    });
    queue.send(job).await.map_err(|_| E::from(StoreError::Closed))?;
    rx.await.map_err(|_| E::from(StoreError::Closed))?
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
/// it (a restart, a failover, an administrator ending the session): the
/// write or read that found it closed fails, the ones queued behind it
/// wait, and the thread goes on once it is connected again.
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
    fn reconnect(&self, writer: Option<&str>, jobs: &Mutex<mpsc::Receiver<Job>>) -> Option<Client> {
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
}

impl PgTx<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
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
        Ok(self.client.execute(&statement, &parameters(params))?)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let statement = self.statement(sql)?;
        let rows = self.client.query(&statement, &parameters(params))?;
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

/// Runs writes one per transaction. Two replicas' batches could lock the
/// same rows in opposite orders (user X then Y against Y then X) and
/// deadlock, failing every write in both; a write alone locks its few rows
/// in the order its code gives. PostgreSQL still shares its WAL flushes
/// among the commits of concurrent connections. Alone in its transaction,
/// a write needs no savepoint: a failed one is rolled back whole, which
/// saves two round trips a write.
fn run_writer(mut client: Client, connector: &Connector, name: &str, jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let mut prepared = HashMap::new();
    loop {
        // One writer waits for the queue at a time; the lock is released
        // before the write runs.
        let next = jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .blocking_recv();
        let Some(job) = next else { return };
        let (outcome, done) = run_in_transaction(&mut client, &mut prepared, job);
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "store write failed");
            let _ = client.batch_execute("ROLLBACK");
        }
        if let Some(done) = done {
            done(outcome.as_ref().map(|_| ()).map_err(String::as_str));
        }
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

/// Runs one write in a transaction of its own and commits it, or rolls it
/// back when the write says not to keep it. Returns the outcome and the
/// write's completion (none when the write did not finish: dropped, it
/// answers its caller `Closed`).
fn run_in_transaction(
    client: &mut Client,
    prepared: &mut HashMap<String, Statement>,
    job: Job,
) -> (Result<(), String>, Option<Completion>) {
    if let Err(e) = client.batch_execute("BEGIN") {
        // The write never ran; dropped, it answers its caller `Closed`.
        return (Err(e.to_string()), None);
    }
    let finish = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        job(&mut PgTx {
            client: &mut *client,
            prepared: &mut *prepared,
        })
    }));
    let Ok(finish) = finish else {
        tracing::error!("a store write panicked; rolled back");
        return (client.batch_execute("ROLLBACK").map_err(|e| e.to_string()), None);
    };
    let end = if finish.keep { "COMMIT" } else { "ROLLBACK" };
    (
        client.batch_execute(end).map_err(|e| e.to_string()),
        Some(finish.done),
    )
}

fn run_reader(mut client: Client, connector: &Connector, jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let mut prepared = HashMap::new();
    loop {
        let next = jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .blocking_recv();
        let Some(job) = next else { return };
        let finish = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            job(&mut PgTx {
                client: &mut client,
                prepared: &mut prepared,
            })
        }));
        match finish {
            Ok(finish) => (finish.done)(Ok(())),
            Err(_) => tracing::error!("a store read panicked"),
        }
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
    use super::described;

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
