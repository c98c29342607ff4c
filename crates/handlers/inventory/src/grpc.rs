//! `sagamesh.v1.Inventory`: the catalog and what users hold.

use std::sync::Arc;

use sagamesh_proto::v1::inventory_server::{Inventory as InventoryApi, InventoryServer};
use sagamesh_proto::v1::{CreateItemRequest, GetItemRequest, GetUserItemsRequest, Item, UserItems};
use tonic::{Request, Response, Status};

use crate::{Inventory, InventoryError};

/// Largest price or stock accepted, so sums stay within SQLite's integers.
const MAX_AMOUNT: u64 = i64::MAX as u64 / 2;
const MAX_NAME_LEN: usize = 256;

pub struct InventoryService {
    inventory: Inventory,
}

impl InventoryService {
    pub fn new(inventory: Inventory) -> InventoryService {
        InventoryService { inventory }
    }

    /// The service ready to serve, sharing `service` with in-process callers.
    pub fn server(service: Arc<InventoryService>) -> InventoryServer<InventoryService> {
        InventoryServer::from_arc(service)
    }
}

fn check_id(field: &'static str, value: &str) -> Result<(), Status> {
    sagamesh_saga::validate_id(field, value).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl InventoryApi for InventoryService {
    async fn create_item(&self, request: Request<CreateItemRequest>) -> Result<Response<Item>, Status> {
        let CreateItemRequest {
            item_id,
            name,
            price,
            stock,
        } = request.into_inner();
        check_id("item_id", &item_id)?;
        if name.trim().is_empty() {
            return Err(Status::invalid_argument("name must not be blank"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(Status::invalid_argument(format!(
                "name is {} bytes long; the limit is {MAX_NAME_LEN}",
                name.len()
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "name may hold only printable characters",
            ));
        }
        for (field, value) in [("price", price), ("stock", stock)] {
            if value > MAX_AMOUNT {
                return Err(Status::invalid_argument(format!(
                    "{field} {value} is more than the limit of {MAX_AMOUNT}"
                )));
            }
        }
        let item = Item {
            item_id,
            name,
            price,
            stock,
        };
        self.inventory.create_item(item.clone()).await?;
        Ok(Response::new(item))
    }

    async fn get_item(&self, request: Request<GetItemRequest>) -> Result<Response<Item>, Status> {
        let item_id = request.into_inner().item_id;
        check_id("item_id", &item_id)?;
        Ok(Response::new(self.inventory.item(item_id).await?))
    }

    async fn get_user_items(
        &self,
        request: Request<GetUserItemsRequest>,
    ) -> Result<Response<UserItems>, Status> {
        let user_id = request.into_inner().user_id;
        check_id("user_id", &user_id)?;
        let items = self.inventory.user_items(user_id.clone()).await?;
        Ok(Response::new(UserItems { user_id, items }))
    }
}

impl From<InventoryError> for Status {
    fn from(e: InventoryError) -> Status {
        match e {
            InventoryError::ItemExists(_) => Status::already_exists(e.to_string()),
            InventoryError::NoSuchItem(_) => Status::not_found(e.to_string()),
            InventoryError::Store(e) => {
                tracing::error!(error = %e, "inventory store failed");
                Status::unavailable("the inventory store is unavailable; try again")
            }
        }
    }
}
