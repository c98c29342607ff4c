//! Once-only effects: a service claims `(transaction, action)` in the same
//! transaction as the effect, so a redelivered event finds the claim and does
//! nothing twice. A rolled-back attempt releases its claim with it.

use sagamesh_store::{StoreError, Tx, values};

/// The claims table, to add to a service's migrations.
pub const PROCESSED_MIGRATION: &str = "
    CREATE TABLE processed (
        transaction_id TEXT NOT NULL,
        action TEXT NOT NULL,
        PRIMARY KEY (transaction_id, action)
    ) WITHOUT ROWID";

/// The claims table on PostgreSQL.
pub const PROCESSED_MIGRATION_POSTGRES: &str = "
    CREATE TABLE processed (
        transaction_id TEXT NOT NULL,
        action TEXT NOT NULL,
        PRIMARY KEY (transaction_id, action)
    )";

/// Claims an action for a transaction; false when it was already done.
pub fn claim(tx: &mut dyn Tx, transaction_id: &str, action: &str) -> Result<bool, StoreError> {
    let inserted = tx.execute(
        "INSERT INTO processed (transaction_id, action) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
        &values![transaction_id, action],
    )?;
    Ok(inserted == 1)
}

/// Whether an action was claimed for a transaction.
pub fn claimed(tx: &mut dyn Tx, transaction_id: &str, action: &str) -> Result<bool, StoreError> {
    let found = tx.query_opt(
        "SELECT 1 FROM processed WHERE transaction_id = $1 AND action = $2",
        &values![transaction_id, action],
    )?;
    Ok(found.is_some())
}
