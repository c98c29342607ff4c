//! The inventory service: the item catalog (name, price, stock) and what each
//! user holds. It owns the item-grant step (move the quantity from stock to
//! the user) and its compensation (take the items back into stock, once).
//! The coordinator prices purchases from this catalog.

mod grpc;

use std::sync::Arc;

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Item, ItemGranted, PurchaseDetails, Step, UserItem};
use sagamesh_router_client::{
    OUTBOX_MIGRATION, OUTBOX_MIGRATION_POSTGRES, OUTBOX_WRITER_MIGRATION, PROCESSED_MIGRATION,
    PROCESSED_MIGRATION_POSTGRES,
};
use sagamesh_step::{Outcome, StepOwner};
use sagamesh_store::{Database, Schema, Store, StoreError, Tx, values};

pub use grpc::InventoryService;

const SCHEMA: Schema = Schema {
    sqlite: &[
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
        // Each outbox row's writer, for replicas sharing a database.
        OUTBOX_WRITER_MIGRATION,
    ],
    postgres: &[
        "CREATE TABLE items (
        item_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        price BIGINT NOT NULL CHECK (price >= 0),
        stock BIGINT NOT NULL CHECK (stock >= 0)
    )",
        "CREATE TABLE user_items (
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        quantity BIGINT NOT NULL CHECK (quantity >= 0),
        PRIMARY KEY (user_id, item_id)
    )",
        "CREATE TABLE grants (
        transaction_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        quantity BIGINT NOT NULL,
        returned BIGINT NOT NULL DEFAULT 0
    )",
        PROCESSED_MIGRATION_POSTGRES,
        OUTBOX_MIGRATION_POSTGRES,
    ],
};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("item '{0}' already exists")]
    ItemExists(String),
    #[error("item '{0}' is not in the catalog")]
    NoSuchItem(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The inventory store, in `<data dir>/inventory.db`.
#[derive(Clone)]
pub struct Inventory {
    store: Store,
}

impl Inventory {
    pub fn open(database: &Database) -> Result<Inventory, StoreError> {
        let store = Store::open_service(database, "inventory", &SCHEMA)?;
        Ok(Inventory { store })
    }

    pub fn store(&self) -> Store {
        self.store.clone()
    }

    pub async fn create_item(&self, item: Item) -> Result<(), InventoryError> {
        self.store
            .write(move |tx| {
                let inserted = tx.execute(
                    "INSERT INTO items (item_id, name, price, stock) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                    &values![&item.item_id, &item.name, item.price as i64, item.stock as i64],
                )?;
                if inserted == 0 {
                    return Err(InventoryError::ItemExists(item.item_id.clone()));
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
            .read(move |tx| {
                let Some(row) = tx.query_opt(
                    "SELECT name, price, stock FROM items WHERE item_id = $1",
                    &values![&item_id],
                )?
                else {
                    return Err(InventoryError::NoSuchItem(item_id));
                };
                Ok(Item {
                    name: row.string(0)?,
                    price: row.int(1)? as u64,
                    stock: row.int(2)? as u64,
                    item_id,
                })
            })
            .await
    }

    pub async fn user_items(&self, user_id: String) -> Result<Vec<UserItem>, InventoryError> {
        self.store
            .read(move |tx| {
                let rows = tx.query(
                    "SELECT item_id, quantity FROM user_items
                     WHERE user_id = $1 AND quantity > 0 ORDER BY item_id",
                    &values![user_id],
                )?;
                let items = rows
                    .iter()
                    .map(|row| {
                        Ok(UserItem {
                            item_id: row.string(0)?,
                            quantity: row.int(1)? as u64,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok(items)
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
        tx: &mut dyn Tx,
        transaction_id: &str,
        purchase: &PurchaseDetails,
    ) -> Result<Outcome, StoreError> {
        let (user_id, item_id, quantity) = (&purchase.user_id, &purchase.item_id, purchase.quantity as i64);
        let Some(row) = tx.query_opt(
            "SELECT stock, price FROM items WHERE item_id = $1",
            &values![item_id],
        )?
        else {
            return Ok(Outcome::Failure(format!(
                "item '{item_id}' is not in the catalog"
            )));
        };
        let (stock, price) = (row.int(0)?, row.int(1)? as u64);
        // The saga charged what the coordinator priced; the catalog is the
        // inventory's, and an item priced before it existed (at 0) or at
        // another price must not be handed out for it.
        if purchase.unit_price != price {
            return Ok(Outcome::Failure(format!(
                "'{item_id}' costs {price} a unit, but this purchase was priced at {}",
                purchase.unit_price
            )));
        }
        if stock < quantity {
            return Ok(Outcome::Failure(format!(
                "out of stock: {stock} of '{item_id}' left, {quantity} asked"
            )));
        }
        tx.execute(
            "UPDATE items SET stock = stock - $2 WHERE item_id = $1",
            &values![item_id, quantity],
        )?;
        tx.execute(
            "INSERT INTO user_items (user_id, item_id, quantity) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, item_id) DO UPDATE SET quantity = user_items.quantity + excluded.quantity",
            &values![user_id, item_id, quantity],
        )?;
        tx.execute(
            "INSERT INTO grants (transaction_id, user_id, item_id, quantity) VALUES ($1, $2, $3, $4)",
            &values![transaction_id, user_id, item_id, quantity],
        )?;
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
        tx: &mut dyn Tx,
        transaction_id: &str,
        _purchase: &PurchaseDetails,
    ) -> Result<Result<String, String>, StoreError> {
        let grant = tx.query_opt(
            "SELECT user_id, item_id, quantity, returned FROM grants WHERE transaction_id = $1",
            &values![transaction_id],
        )?;
        let Some(grant) = grant else {
            return Ok(Ok("nothing was granted".to_owned()));
        };
        let (user_id, item_id, quantity, returned) = (
            grant.string(0)?,
            grant.string(1)?,
            grant.int(2)?,
            grant.int(3)? != 0,
        );
        if returned {
            return Ok(Ok(format!("{item_id} x{quantity} already returned")));
        }
        let taken = tx.execute(
            "UPDATE user_items SET quantity = quantity - $3
             WHERE user_id = $1 AND item_id = $2 AND quantity >= $3",
            &values![&user_id, &item_id, quantity],
        )?;
        if taken == 0 {
            return Ok(Err(format!(
                "user '{user_id}' no longer holds {quantity} of '{item_id}'"
            )));
        }
        tx.execute(
            "UPDATE items SET stock = stock + $2 WHERE item_id = $1",
            &values![&item_id, quantity],
        )?;
        tx.execute(
            "UPDATE grants SET returned = 1 WHERE transaction_id = $1",
            &values![transaction_id],
        )?;
        Ok(Ok(format!("took back {item_id} x{quantity} from {user_id}")))
    }
}

/// Starts the inventory service's step handler; the gRPC service is separate.
pub async fn start(
    inventory: &Inventory,
    router: sagamesh_router_client::RouterLink,
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

#[cfg(test)]
mod tests {
    use sagamesh_store::Durability;

    use super::*;

    async fn catalog() -> (tempfile::TempDir, Inventory) {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::Embedded {
            dir: dir.path().to_owned(),
            durability: Durability::Process,
        };
        let inventory = Inventory::open(&database).unwrap();
        inventory
            .create_item(Item {
                item_id: "sword".into(),
                name: "Sword".into(),
                price: 100,
                stock: 10,
            })
            .await
            .unwrap();
        (dir, inventory)
    }

    async fn grant(inventory: &Inventory, unit_price: u64) -> (Outcome, u64) {
        let purchase = PurchaseDetails {
            user_id: "alice".into(),
            item_id: "sword".into(),
            quantity: 2,
            unit_price,
            total_price: unit_price * 2,
            ..PurchaseDetails::default()
        };
        let outcome = inventory
            .store()
            .write(move |tx| ItemGrant.execute(tx, "tx-1", &purchase))
            .await
            .unwrap();
        let stock = inventory.item("sword".into()).await.unwrap().stock;
        (outcome, stock)
    }

    #[tokio::test]
    async fn an_item_is_granted_only_at_its_catalog_price() {
        let (_dir, inventory) = catalog().await;
        // Priced while the item was not yet in the catalog, or at another
        // price: nothing is handed out.
        for wrong in [0, 99] {
            let (outcome, stock) = grant(&inventory, wrong).await;
            let Outcome::Failure(reason) = outcome else {
                panic!("granted at {wrong}");
            };
            assert_eq!(
                reason,
                format!("'sword' costs 100 a unit, but this purchase was priced at {wrong}")
            );
            assert_eq!(stock, 10);
        }
        let (outcome, stock) = grant(&inventory, 100).await;
        assert!(matches!(outcome, Outcome::Success { .. }));
        assert_eq!(stock, 8);
    }
}
