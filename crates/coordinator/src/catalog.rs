//! Where `Purchase` looks up prices: the inventory service, which owns the
//! catalog. In a process that also runs the inventory service the
//! coordinator calls it directly; otherwise over gRPC.

use std::sync::Arc;

use sagamesh_proto::v1::inventory_client::InventoryClient;
use sagamesh_proto::v1::inventory_server::Inventory;
use sagamesh_proto::v1::{GetItemRequest, Item};
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The inventory service as the coordinator reaches it; cheap to clone.
#[derive(Clone)]
pub enum Catalog {
    /// The inventory service of this process: the same validation and
    /// answers as over the network, without encoding or a connection.
    InProcess(Arc<dyn Inventory>),
    /// An inventory service across the network.
    Remote(InventoryClient<Channel>),
}

impl Catalog {
    pub fn remote(channel: Channel) -> Catalog {
        Catalog::Remote(InventoryClient::new(channel))
    }

    pub(crate) async fn get_item(&self, item_id: &str) -> Result<Item, Status> {
        let request = GetItemRequest {
            item_id: item_id.to_owned(),
        };
        let response = match self {
            Catalog::InProcess(inventory) => inventory.get_item(Request::new(request)).await?,
            Catalog::Remote(client) => client.clone().get_item(request).await?,
        };
        Ok(response.into_inner())
    }
}
