//! A writer connection's statements, prepared once and kept in place.
//!
//! rusqlite's statement cache (`prepare_cached`) takes a statement out of
//! an LRU list for every use and puts it back afterwards, hashing the SQL
//! text both times, and resets the statement and clears its bindings on
//! the way: for a saga step's short statements that bookkeeping cost about
//! a third of what binding and running them did. A store's writer thread
//! holds one connection for its whole life and runs a small, fixed set of
//! statements, so it keeps them here, found by their text. SQL built at run
//! time could make that set grow without end: past [`MOST_KEPT`]
//! statements, new ones go through rusqlite's cache instead. A kept
//! statement also keeps which `$N` each of its parameters is (see
//! [`crate::bind`]), read once from SQLite instead of at every bind.

use std::ops::{Deref, DerefMut};

use foldhash::{HashMap, HashMapExt};

use rusqlite::{CachedStatement, Connection, Statement};

/// Most statements kept; each service runs a few dozen.
const MOST_KEPT: usize = 256;

/// The statements of one writer connection, which it derefs to.
pub(crate) struct Prepared<'c> {
    conn: &'c Connection,
    /// Found by the text, hashed the way rusqlite's own cache does
    /// (foldhash: a few dozen instructions for a statement, against
    /// hundreds for the standard library's SipHash).
    index: HashMap<Box<str>, usize>,
    statements: Vec<(Statement<'c>, Box<[Option<usize>]>)>,
}

/// A statement ready to bind and run. Running one resets it (rusqlite does
/// after `raw_execute` and when `Rows` is dropped), and each use binds
/// every parameter again, so a kept statement needs no other cleaning.
pub(crate) enum PreparedStatement<'a, 'c> {
    /// A kept statement and the `$N` of each of its parameters.
    Kept(&'a mut Statement<'c>, &'a [Option<usize>]),
    Cached(CachedStatement<'c>),
}

impl<'c> Prepared<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Prepared<'c> {
        Prepared {
            conn,
            index: HashMap::new(),
            statements: Vec::new(),
        }
    }

    pub(crate) fn statement(&mut self, sql: &str) -> rusqlite::Result<PreparedStatement<'_, 'c>> {
        let at = match self.index.get(sql) {
            Some(&at) => at,
            None if self.statements.len() >= MOST_KEPT => {
                return self.conn.prepare_cached(sql).map(PreparedStatement::Cached);
            }
            None => {
                let statement = self.conn.prepare(sql)?;
                let numbers = (1..=statement.parameter_count())
                    .map(|index| crate::parameter_number(&statement, index))
                    .collect();
                self.index.insert(sql.into(), self.statements.len());
                self.statements.push((statement, numbers));
                self.statements.len() - 1
            }
        };
        let (statement, numbers) = &mut self.statements[at];
        Ok(PreparedStatement::Kept(statement, numbers))
    }
}

impl PreparedStatement<'_, '_> {
    /// Binds `params` to the statement's `$N` parameters.
    pub(crate) fn bind(&mut self, params: &[crate::Value]) -> Result<(), crate::StoreError> {
        match self {
            PreparedStatement::Kept(statement, numbers) => crate::bind(statement, Some(numbers), params),
            PreparedStatement::Cached(statement) => crate::bind(statement, None, params),
        }
    }
}

impl Deref for Prepared<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl<'c> Deref for PreparedStatement<'_, 'c> {
    type Target = Statement<'c>;

    fn deref(&self) -> &Statement<'c> {
        match self {
            PreparedStatement::Kept(statement, _) => statement,
            PreparedStatement::Cached(statement) => statement,
        }
    }
}

impl DerefMut for PreparedStatement<'_, '_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            PreparedStatement::Kept(statement, _) => statement,
            PreparedStatement::Cached(statement) => statement,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_prepared_once_and_past_the_limit_cached_by_rusqlite() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER)").unwrap();
        let mut prepared = Prepared::new(&conn);
        for n in 0..3 {
            let mut insert = prepared.statement("INSERT INTO t (n) VALUES (?1)").unwrap();
            insert.raw_bind_parameter(1, n).unwrap();
            insert.raw_execute().unwrap();
        }
        assert_eq!(prepared.statements.len(), 1);
        for n in 0..MOST_KEPT + 5 {
            let sql = format!("SELECT {n}");
            let mut select = prepared.statement(&sql).unwrap();
            let mut rows = select.raw_query();
            assert_eq!(rows.next().unwrap().unwrap().get::<_, usize>(0).unwrap(), n);
        }
        assert_eq!(prepared.statements.len(), MOST_KEPT);
        let total: i64 = prepared
            .query_row("SELECT sum(n) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(total, 3);
    }

    #[test]
    fn a_kept_statement_that_failed_runs_again() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER UNIQUE)").unwrap();
        let mut prepared = Prepared::new(&conn);
        let mut insert = |n: i64| {
            let mut statement = prepared.statement("INSERT INTO t (n) VALUES (?1)").unwrap();
            statement.raw_bind_parameter(1, n).unwrap();
            statement.raw_execute()
        };
        insert(1).unwrap();
        assert!(insert(1).is_err(), "a duplicate breaks the unique constraint");
        assert_eq!(insert(2).unwrap(), 1);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 2);
    }
}
