//! `sagamesh.v1.PurchaseCoordinator`: checks input, calls the coordinator,
//! maps its errors to statuses.

use std::pin::Pin;
use std::sync::atomic::Ordering;

use sagamesh_proto::v1::purchase_coordinator_server::{PurchaseCoordinator, PurchaseCoordinatorServer};
use sagamesh_proto::v1::{
    GetStatsRequest, GetTransactionRequest, ListTransactionsRequest, ListTransactionsResponse, ModeStats,
    PurchaseRequest, PurchaseResponse, SagaMode, Stats, StatusCount, StreamTransactionRequest,
    TransactionStatus, TransactionUpdate,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{Coordinator, CoordinatorError, PurchaseOrder, store, view};

/// Updates waiting to be sent to one `StreamTransaction` client. When full,
/// the forwarder waits; the broadcast behind it absorbs the burst.
const STREAM_QUEUE: usize = 16;
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: u32 = 1_000;

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
        let user_id = if request.user_id.is_empty() {
            None
        } else {
            sagamesh_saga::validate_id("user_id", &request.user_id)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Some(request.user_id)
        };
        let limit = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n as usize,
            n => {
                return Err(Status::invalid_argument(format!(
                    "page_size must be between 1 and {MAX_PAGE_SIZE}, not {n}"
                )));
            }
        };
        let before = if request.page_token.is_empty() {
            i64::MAX
        } else {
            request
                .page_token
                .parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Status::invalid_argument("page_token is not one this service returned"))?
        };
        let page = self
            .coordinator
            .inner
            .store
            .read(move |conn| store::list(conn, status, user_id.as_deref(), before, limit))
            .await?;
        let next_page_token = match page.last() {
            Some((seq, _)) if page.len() == limit => seq.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(ListTransactionsResponse {
            transactions: page.into_iter().map(|(_, t)| t).collect(),
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
        // Subscribe first, so no change is missed between read and subscribe.
        let mut watch = self.coordinator.inner.watchers.watch(&id);
        let current = self.coordinator.transaction(id.clone()).await?;
        let coordinator = self.coordinator.clone();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(async move {
            let mut seen = current.history.len();
            let done = view::is_terminal(current.status());
            let first = TransactionUpdate {
                transaction: Some(current),
                event: 0,
            };
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            loop {
                let update = match watch.updates.recv().await {
                    Ok(update) => (*update).clone(),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        match coordinator.transaction(id.clone()).await {
                            Ok(transaction) => TransactionUpdate {
                                transaction: Some(transaction),
                                event: 0,
                            },
                            Err(e) => {
                                let _ = tx.send(Err(Status::from(e))).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(transaction) = update.transaction.as_ref() else {
                    continue;
                };
                if transaction.history.len() <= seen {
                    continue;
                }
                seen = transaction.history.len();
                let done = view::is_terminal(transaction.status());
                if tx.send(Ok(update)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_stats(&self, _request: Request<GetStatsRequest>) -> Result<Response<Stats>, Status> {
        let counts = self.coordinator.inner.store.read(store::status_counts).await?;
        let all: Vec<(i32, u64)> = counts.iter().fold(Vec::new(), |mut all, (_, status, count)| {
            match all.iter_mut().find(|(s, _)| s == status) {
                Some((_, total)) => *total += count,
                None => all.push((*status, *count)),
            }
            all
        });
        let overall = figures(&all);
        let by_mode = [SagaMode::Choreography, SagaMode::Orchestration]
            .into_iter()
            .map(|mode| {
                let counts: Vec<(i32, u64)> = counts
                    .iter()
                    .filter(|(m, _, _)| *m == mode as i32)
                    .map(|(_, s, n)| (*s, *n))
                    .collect();
                let (total, by_status, success_rate) = figures(&counts);
                ModeStats {
                    mode: mode as i32,
                    total,
                    by_status,
                    success_rate,
                }
            })
            .collect();
        Ok(Response::new(Stats {
            total: overall.0,
            by_status: overall.1,
            success_rate: overall.2,
            step_durations: self.coordinator.inner.steps.snapshot(),
            compensation_failures: self
                .coordinator
                .inner
                .compensation_failures
                .load(Ordering::Relaxed),
            by_mode,
            dead_letters: self.coordinator.inner.dead_letters.load(Ordering::Relaxed),
        }))
    }
}

/// Total, counts per status and success rate of `(status, count)` pairs.
fn figures(counts: &[(i32, u64)]) -> (u64, Vec<StatusCount>, f64) {
    let total = counts.iter().map(|(_, n)| n).sum();
    let of = |status: TransactionStatus| {
        counts
            .iter()
            .find(|(s, _)| *s == status as i32)
            .map_or(0, |(_, n)| *n)
    };
    let completed = of(TransactionStatus::Completed);
    let ended = completed + of(TransactionStatus::Failed) + of(TransactionStatus::NeedsAttention);
    let mut by_status: Vec<StatusCount> = counts
        .iter()
        .map(|(status, count)| StatusCount {
            status: *status,
            count: *count,
        })
        .collect();
    by_status.sort_by_key(|c| c.status);
    let success_rate = if ended == 0 {
        0.0
    } else {
        completed as f64 / ended as f64
    };
    (total, by_status, success_rate)
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        match e {
            CoordinatorError::Input(_) | CoordinatorError::PriceOverflow { .. } => {
                Status::invalid_argument(e.to_string())
            }
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
