//! The wallets service: users and their balances. It owns the
//! user-validation step (check the user can pay, deduct the price) and its
//! compensation (refund exactly what was deducted, once).

mod grpc;

use std::sync::Arc;

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{PurchaseDetails, Step, UserValidated};
use sagamesh_router_client::{
    OUTBOX_MIGRATION, OUTBOX_MIGRATION_POSTGRES, OUTBOX_WRITER_MIGRATION, PROCESSED_MIGRATION,
    PROCESSED_MIGRATION_POSTGRES,
};
use sagamesh_step::{Outcome, StepOwner};
use sagamesh_store::{Database, Schema, Store, StoreError, Tx, values};

pub use grpc::WalletsService;

const SCHEMA: Schema = Schema {
    sqlite: &[
        "CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        balance INTEGER NOT NULL CHECK (balance >= 0)
    ) WITHOUT ROWID",
        "CREATE TABLE deductions (
        transaction_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        amount INTEGER NOT NULL,
        refunded INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID",
        PROCESSED_MIGRATION,
        OUTBOX_MIGRATION,
        // Each outbox row's writer, for replicas sharing a database.
        OUTBOX_WRITER_MIGRATION,
    ],
    postgres: &[
        "CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        balance BIGINT NOT NULL CHECK (balance >= 0)
    )",
        "CREATE TABLE deductions (
        transaction_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        amount BIGINT NOT NULL,
        refunded BIGINT NOT NULL DEFAULT 0
    )",
        PROCESSED_MIGRATION_POSTGRES,
        OUTBOX_MIGRATION_POSTGRES,
    ],
};

#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("user '{0}' already exists")]
    UserExists(String),
    #[error("user '{0}' does not exist")]
    NoSuchUser(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The wallets store, in `<data dir>/wallets.db`.
#[derive(Clone)]
pub struct Wallets {
    store: Store,
}

impl Wallets {
    pub fn open(database: &Database) -> Result<Wallets, StoreError> {
        let store = Store::open_service(database, "wallets", &SCHEMA)?;
        Ok(Wallets { store })
    }

    pub fn store(&self) -> Store {
        self.store.clone()
    }

    pub async fn create_user(&self, user_id: String, balance: u64) -> Result<(), WalletError> {
        self.store
            .write(move |tx| {
                let inserted = tx.execute(
                    "INSERT INTO users (user_id, balance) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &values![&user_id, balance as i64],
                )?;
                if inserted == 0 {
                    return Err(WalletError::UserExists(user_id.clone()));
                }
                Ok(())
            })
            .await
    }

    /// Creates the user unless it exists (for demo data).
    pub async fn ensure_user(&self, user_id: String, balance: u64) -> Result<(), WalletError> {
        match self.create_user(user_id, balance).await {
            Err(WalletError::UserExists(_)) => Ok(()),
            other => other,
        }
    }

    pub async fn balance(&self, user_id: String) -> Result<u64, WalletError> {
        self.store
            .read(move |tx| balance(tx, &user_id)?.ok_or(WalletError::NoSuchUser(user_id)))
            .await
    }
}

fn balance(tx: &mut dyn Tx, user_id: &str) -> Result<Option<u64>, StoreError> {
    let row = tx.query_opt("SELECT balance FROM users WHERE user_id = $1", &values![user_id])?;
    row.map(|row| row.int(0).map(|b| b as u64)).transpose()
}

/// The user-validation step.
pub struct UserValidation;

impl StepOwner for UserValidation {
    const STEP: Step = Step::UserValidation;
    const GROUP: &'static str = "wallets";
    const HANDLER: &'static str = "UserValidationHandler";

    fn execute(
        &self,
        tx: &mut dyn Tx,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> Result<Outcome, StoreError> {
        let user_id = &purchase.user_id;
        let price = purchase.total_price;
        let Some(current) = balance(tx, user_id)? else {
            return Ok(Outcome::Failure(format!("user '{user_id}' does not exist")));
        };
        if current < price {
            return Ok(Outcome::Failure(format!(
                "insufficient balance: user '{user_id}' has {current}, the purchase costs {price}"
            )));
        }
        tx.execute(
            "UPDATE users SET balance = balance - $2 WHERE user_id = $1",
            &values![user_id, price as i64],
        )?;
        tx.execute(
            "INSERT INTO deductions (transaction_id, user_id, amount) VALUES ($1, $2, $3)",
            &values![transaction_id, user_id, price as i64],
        )?;
        Ok(Outcome::Success {
            event: Payload::UserValidated(UserValidated {
                purchase: Some(purchase.clone()),
                timing: None,
                balance_after: current - price,
            }),
            summary: format!("{user_id} paid {price}, balance {}", current - price),
        })
    }

    fn compensate(
        &self,
        tx: &mut dyn Tx,
        transaction_id: &str,
        _purchase: &PurchaseDetails,
    ) -> Result<Result<String, String>, StoreError> {
        let deduction = tx.query_opt(
            "SELECT user_id, amount, refunded FROM deductions WHERE transaction_id = $1",
            &values![transaction_id],
        )?;
        let Some(deduction) = deduction else {
            return Ok(Ok("nothing was deducted".to_owned()));
        };
        let (user_id, amount, refunded) = (deduction.string(0)?, deduction.int(1)?, deduction.int(2)? != 0);
        if refunded {
            return Ok(Ok(format!("{amount} already refunded to {user_id}")));
        }
        let credited = tx.execute(
            "UPDATE users SET balance = balance + $2 WHERE user_id = $1",
            &values![&user_id, amount],
        )?;
        if credited == 0 {
            return Ok(Err(format!(
                "user '{user_id}' no longer exists; {amount} cannot be refunded"
            )));
        }
        tx.execute(
            "UPDATE deductions SET refunded = 1 WHERE transaction_id = $1",
            &values![transaction_id],
        )?;
        Ok(Ok(format!("refunded {amount} to {user_id}")))
    }
}

/// Starts the wallets service's step handler; the gRPC service is separate.
pub async fn start(
    wallets: &Wallets,
    router: sagamesh_router_client::RouterLink,
    config: sagamesh_step::StepConfig,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), sagamesh_router_client::ClientError> {
    sagamesh_step::start(
        Arc::new(UserValidation),
        wallets.store(),
        router,
        config,
        tasks,
        shutdown,
    )
    .await
}
