//! `sagamesh.v1.PurchaseCoordinator`: checks input, calls the coordinator,
//! maps its errors to statuses.

use std::pin::Pin;

use sagamesh_proto::v1::purchase_coordinator_server::{PurchaseCoordinator, PurchaseCoordinatorServer};
use sagamesh_proto::v1::{
    GetStatsRequest, GetTransactionRequest, ListTransactionsRequest, ListTransactionsResponse,
    PurchaseRequest, PurchaseResponse, Stats, StreamTransactionRequest, TransactionStatus, TransactionUpdate,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{Coordinator, CoordinatorError, PurchaseOrder};

pub struct CoordinatorService {
    coordinator: Coordinator,
}

impl CoordinatorService {
    pub fn new(coordinator: Coordinator) -> PurchaseCoordinatorServer<CoordinatorService> {
        PurchaseCoordinatorServer::new(CoordinatorService { coordinator })
    }
}

fn check_transaction_id(id: &str) -> Result<(), Status> {
    sagamesh_saga::validate_id("transaction_id", id).map_err(|e| Status::invalid_argument(e.to_string()))
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<TransactionUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl PurchaseCoordinator for CoordinatorService {
    async fn purchase(
        &self,
        request: Request<PurchaseRequest>,
    ) -> Result<Response<PurchaseResponse>, Status> {
        let request = request.into_inner();
        let transaction = self
            .coordinator
            .purchase(PurchaseOrder {
                user_id: request.user_id,
                item_id: request.item_id,
                quantity: request.quantity,
                idempotency_key: request.idempotency_key,
            })
            .await?;
        Ok(Response::new(PurchaseResponse {
            transaction_id: transaction.transaction_id,
            status: transaction.status,
        }))
    }

    async fn get_transaction(
        &self,
        request: Request<GetTransactionRequest>,
    ) -> Result<Response<sagamesh_proto::v1::Transaction>, Status> {
        let id = request.into_inner().transaction_id;
        check_transaction_id(&id)?;
        Ok(Response::new(self.coordinator.transaction(id).await?))
    }

    async fn list_transactions(
        &self,
        request: Request<ListTransactionsRequest>,
    ) -> Result<Response<ListTransactionsResponse>, Status> {
        let request = request.into_inner();
        let status = match TransactionStatus::try_from(request.status) {
            Ok(TransactionStatus::Unspecified) => None,
            Ok(status) => Some(status),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "status {} is not a transaction status",
                    request.status
                )));
            }
        };
        let (transactions, next_page_token) = self
            .coordinator
            .list(status, request.user_id, request.page_size, &request.page_token)
            .await?;
        Ok(Response::new(ListTransactionsResponse {
            transactions,
            next_page_token,
        }))
    }

    type StreamTransactionStream = UpdateStream;

    async fn stream_transaction(
        &self,
        request: Request<StreamTransactionRequest>,
    ) -> Result<Response<Self::StreamTransactionStream>, Status> {
        let id = request.into_inner().transaction_id;
        check_transaction_id(&id)?;
        let updates = self.coordinator.watch(id).await?;
        let stream = updates.map(|update| update.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_stats(&self, _request: Request<GetStatsRequest>) -> Result<Response<Stats>, Status> {
        Ok(Response::new(self.coordinator.stats().await?))
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        match e {
            CoordinatorError::Input(_)
            | CoordinatorError::PriceOverflow { .. }
            | CoordinatorError::BadPage(_) => Status::invalid_argument(e.to_string()),
            CoordinatorError::NoSuchTransaction(_) => Status::not_found(e.to_string()),
            CoordinatorError::KeyReused { .. } => Status::failed_precondition(e.to_string()),
            CoordinatorError::Pricing(_) => Status::unavailable(e.to_string()),
            CoordinatorError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
            CoordinatorError::Corrupt(_) => {
                tracing::error!(error = %e, "coordinator store holds a damaged record");
                Status::data_loss("a stored transaction is damaged")
            }
            CoordinatorError::Store(_) => {
                tracing::error!(error = %e, "coordinator store failed");
                Status::unavailable("the coordinator's store is unavailable; try again")
            }
        }
    }
}
