//! Once-only effects: a service claims `(transaction, action)` in the same
//! transaction as the effect, so a redelivered event finds the claim and does
//! nothing twice. A rolled-back attempt releases its claim with it.

use rusqlite::{Connection, params};

/// The claims table, to add to a service's migrations.
pub const PROCESSED_MIGRATION: &str = "
    CREATE TABLE processed (
        transaction_id TEXT NOT NULL,
        action TEXT NOT NULL,
        PRIMARY KEY (transaction_id, action)
    ) WITHOUT ROWID";

/// Claims an action for a transaction; false when it was already done.
pub fn claim(conn: &Connection, transaction_id: &str, action: &str) -> rusqlite::Result<bool> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO processed (transaction_id, action) VALUES (?1, ?2)
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![transaction_id, action])?;
    Ok(inserted == 1)
}

/// Whether an action was claimed for a transaction.
pub fn claimed(conn: &Connection, transaction_id: &str, action: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM processed WHERE transaction_id = ?1 AND action = ?2")?
        .exists(params![transaction_id, action])
}
