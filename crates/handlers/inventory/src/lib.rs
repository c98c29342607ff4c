//! The inventory service: the item catalog (name, price, stock) and what each
//! user holds. It owns the item-grant step (move the quantity from stock to
//! the user) and its compensation (take the items back into stock, once).
//! The coordinator prices purchases from this catalog.

mod grpc;

use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Item, ItemGranted, PurchaseDetails, Step, UserItem};
use sagamesh_router_client::{OUTBOX_MIGRATION, PROCESSED_MIGRATION};
use sagamesh_sqlite::{Durability, Store, StoreError};
use sagamesh_step::{Outcome, StepOwner};

pub use grpc::InventoryService;

const MIGRATIONS: &[&str] = &[
    "CREATE TABLE items (
        item_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        price INTEGER NOT NULL CHECK (price >= 0),
        stock INTEGER NOT NULL CHECK (stock >= 0)
    ) WITHOUT ROWID",
    "CREATE TABLE user_items (
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        quantity INTEGER NOT NULL CHECK (quantity >= 0),
        PRIMARY KEY (user_id, item_id)
    ) WITHOUT ROWID",
    "CREATE TABLE grants (
        transaction_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        quantity INTEGER NOT NULL,
        returned INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID",
    PROCESSED_MIGRATION,
    OUTBOX_MIGRATION,
];

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("item '{0}' already exists")]
    ItemExists(String),
    #[error("item '{0}' is not in the catalog")]
    NoSuchItem(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for InventoryError {
    fn from(e: rusqlite::Error) -> Self {
        InventoryError::Store(StoreError::Sqlite(e))
    }
}

/// The inventory store, in `<data dir>/inventory.db`.
#[derive(Clone)]
pub struct Inventory {
    store: Store,
}

impl Inventory {
    pub fn open(data_dir: &Path, durability: Durability) -> Result<Inventory, StoreError> {
        let store = Store::open(&data_dir.join("inventory.db"), durability, MIGRATIONS)?;
        Ok(Inventory { store })
    }

    pub fn store(&self) -> Store {
        self.store.clone()
    }

    pub async fn create_item(&self, item: Item) -> Result<(), InventoryError> {
        self.store
            .write(move |conn| {
                let inserted = conn.execute(
                    "INSERT INTO items (item_id, name, price, stock) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO NOTHING",
                    params![item.item_id, item.name, item.price as i64, item.stock as i64],
                )?;
                if inserted == 0 {
                    return Err(InventoryError::ItemExists(item.item_id));
                }
                Ok(())
            })
            .await
    }

    /// Creates the item unless it exists (for demo data).
    pub async fn ensure_item(&self, item: Item) -> Result<(), InventoryError> {
        match self.create_item(item).await {
            Err(InventoryError::ItemExists(_)) => Ok(()),
            other => other,
        }
    }

    pub async fn item(&self, item_id: String) -> Result<Item, InventoryError> {
        self.store
            .read(move |conn| {
                conn.prepare_cached("SELECT name, price, stock FROM items WHERE item_id = ?1")?
                    .query_row([&item_id], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, i64>(1)?,
                            row.get::<_, i64>(2)?,
                        ))
                    })
                    .optional()?
                    .map(|(name, price, stock)| Item {
                        item_id: item_id.clone(),
                        name,
                        price: price as u64,
                        stock: stock as u64,
                    })
                    .ok_or(InventoryError::NoSuchItem(item_id))
            })
            .await
    }

    pub async fn user_items(&self, user_id: String) -> Result<Vec<UserItem>, InventoryError> {
        self.store
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT item_id, quantity FROM user_items
                     WHERE user_id = ?1 AND quantity > 0 ORDER BY item_id",
                )?;
                let rows = stmt.query_map([&user_id], |row| {
                    Ok(UserItem {
                        item_id: row.get(0)?,
                        quantity: row.get::<_, i64>(1)? as u64,
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }
}

/// The item-grant step.
pub struct ItemGrant;

impl StepOwner for ItemGrant {
    const STEP: Step = Step::ItemGrant;
    const GROUP: &'static str = "inventory";
    const HANDLER: &'static str = "ItemGrantHandler";

    fn execute(
        &self,
        conn: &Connection,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> rusqlite::Result<Outcome> {
        let (user_id, item_id, quantity) = (&purchase.user_id, &purchase.item_id, purchase.quantity as i64);
        let stock: Option<i64> = conn
            .prepare_cached("SELECT stock FROM items WHERE item_id = ?1")?
            .query_row([item_id], |row| row.get(0))
            .optional()?;
        let Some(stock) = stock else {
            return Ok(Outcome::Failure(format!(
                "item '{item_id}' is not in the catalog"
            )));
        };
        if stock < quantity {
            return Ok(Outcome::Failure(format!(
                "out of stock: {stock} of '{item_id}' left, {quantity} asked"
            )));
        }
        conn.prepare_cached("UPDATE items SET stock = stock - ?2 WHERE item_id = ?1")?
            .execute(params![item_id, quantity])?;
        conn.prepare_cached(
            "INSERT INTO user_items (user_id, item_id, quantity) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id, item_id) DO UPDATE SET quantity = quantity + excluded.quantity",
        )?
        .execute(params![user_id, item_id, quantity])?;
        conn.prepare_cached(
            "INSERT INTO grants (transaction_id, user_id, item_id, quantity) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![transaction_id, user_id, item_id, quantity])?;
        Ok(Outcome::Success {
            event: Payload::ItemGranted(ItemGranted {
                purchase: Some(purchase.clone()),
                timing: None,
                stock_after: (stock - quantity) as u64,
            }),
            summary: format!("{item_id} x{quantity} to {user_id}"),
        })
    }

    fn compensate(
        &self,
        conn: &Connection,
        transaction_id: &str,
        _purchase: &PurchaseDetails,
    ) -> rusqlite::Result<Result<String, String>> {
        let grant: Option<(String, String, i64, bool)> = conn
            .prepare_cached(
                "SELECT user_id, item_id, quantity, returned FROM grants WHERE transaction_id = ?1",
            )?
            .query_row([transaction_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        let Some((user_id, item_id, quantity, returned)) = grant else {
            return Ok(Ok("nothing was granted".to_owned()));
        };
        if returned {
            return Ok(Ok(format!("{item_id} x{quantity} already returned")));
        }
        let taken = conn
            .prepare_cached(
                "UPDATE user_items SET quantity = quantity - ?3
                 WHERE user_id = ?1 AND item_id = ?2 AND quantity >= ?3",
            )?
            .execute(params![user_id, item_id, quantity])?;
        if taken == 0 {
            return Ok(Err(format!(
                "user '{user_id}' no longer holds {quantity} of '{item_id}'"
            )));
        }
        conn.prepare_cached("UPDATE items SET stock = stock + ?2 WHERE item_id = ?1")?
            .execute(params![item_id, quantity])?;
        conn.prepare_cached("UPDATE grants SET returned = 1 WHERE transaction_id = ?1")?
            .execute([transaction_id])?;
        Ok(Ok(format!("took back {item_id} x{quantity} from {user_id}")))
    }
}

/// Starts the inventory service's step handler; the gRPC service is separate.
pub async fn start(
    inventory: &Inventory,
    router: tonic::transport::Channel,
    config: sagamesh_step::StepConfig,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), sagamesh_router_client::ClientError> {
    sagamesh_step::start(
        Arc::new(ItemGrant),
        inventory.store(),
        router,
        config,
        tasks,
        shutdown,
    )
    .await
}
