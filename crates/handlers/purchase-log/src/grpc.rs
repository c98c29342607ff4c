//! `sagamesh.v1.PurchaseLogs`: read a purchase's log entry.

use sagamesh_proto::v1::purchase_logs_server::{PurchaseLogs as PurchaseLogsApi, PurchaseLogsServer};
use sagamesh_proto::v1::{GetLogRequest, PurchaseLogEntry};
use tonic::{Request, Response, Status};

use crate::{PurchaseLog, PurchaseLogError};

pub struct PurchaseLogsService {
    log: PurchaseLog,
}

impl PurchaseLogsService {
    pub fn new(log: PurchaseLog) -> PurchaseLogsServer<PurchaseLogsService> {
        PurchaseLogsServer::new(PurchaseLogsService { log })
    }
}

#[tonic::async_trait]
impl PurchaseLogsApi for PurchaseLogsService {
    async fn get_log(&self, request: Request<GetLogRequest>) -> Result<Response<PurchaseLogEntry>, Status> {
        let transaction_id = request.into_inner().transaction_id;
        sagamesh_saga::validate_id("transaction_id", &transaction_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(self.log.entry(transaction_id).await?))
    }
}

impl From<PurchaseLogError> for Status {
    fn from(e: PurchaseLogError) -> Status {
        match e {
            PurchaseLogError::NoSuchEntry(_) => Status::not_found(e.to_string()),
            PurchaseLogError::Store(e) => {
                tracing::error!(error = %e, "purchase log store failed");
                Status::unavailable("the purchase log store is unavailable; try again")
            }
        }
    }
}
