//! The read side of the coordinator: pages of transactions, the counts of
//! `GetStats`, and the live updates of `StreamTransaction` (the current
//! state, then each change, ending after a terminal state).

use std::sync::atomic::Ordering;

use sagamesh_proto::v1::{
    ModeStats, SagaMode, Stats, StatusCount, Transaction, TransactionStatus, TransactionUpdate,
};
use tokio::sync::broadcast;
use tokio_stream::Stream;

use crate::watchers::Watch;
use crate::{Coordinator, CoordinatorError, store, view};

/// How often a watch reads the saga again on a store shared by replicas.
const RESYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(20);
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: u32 = 1_000;

impl Coordinator {
    /// A page of transactions, newest first, and the token of the next page
    /// (empty on the last one).
    pub async fn list(
        &self,
        status: Option<TransactionStatus>,
        user_id: String,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Transaction>, String), CoordinatorError> {
        let user_id = if user_id.is_empty() {
            None
        } else {
            sagamesh_saga::validate_id("user_id", &user_id)?;
            Some(user_id)
        };
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n as usize,
            n => {
                return Err(CoordinatorError::BadPage(format!(
                    "page_size must be between 1 and {MAX_PAGE_SIZE}, not {n}"
                )));
            }
        };
        let before = if page_token.is_empty() {
            i64::MAX
        } else {
            page_token.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                CoordinatorError::BadPage("page_token is not one this service returned".into())
            })?
        };
        let page = self
            .inner
            .store
            .read(move |tx| store::list(tx, status, user_id.as_deref(), before, limit))
            .await?;
        let next_page_token = match page.last() {
            Some((seq, _)) if page.len() == limit => seq.to_string(),
            _ => String::new(),
        };
        Ok((page.into_iter().map(|(_, t)| t).collect(), next_page_token))
    }

    /// The transaction now, then one update per change; the stream ends
    /// after a terminal state. `NoSuchTransaction` before anything is sent.
    ///
    /// The stream has no task of its own: the RPC's response body polls it,
    /// so an update goes from the broadcast straight to the connection.
    /// Dropping it (the client went away) ends the watch.
    pub async fn watch(
        &self,
        transaction_id: String,
    ) -> Result<
        impl Stream<Item = Result<TransactionUpdate, CoordinatorError>> + Send + 'static,
        CoordinatorError,
    > {
        // Subscribe first, so no change is missed between read and subscribe.
        let watch = self.inner.watchers.watch(&transaction_id);
        let current = self.transaction(transaction_id.clone()).await?;
        let following = Following {
            coordinator: self.clone(),
            transaction_id,
            watch,
            current: Some(current),
            seen: 0,
            ended: false,
        };
        Ok(futures_util::stream::unfold(following, Following::next))
    }

    /// Counts per status, overall and per mode, and step durations.
    pub async fn stats(&self) -> Result<Stats, CoordinatorError> {
        let counts = self.inner.store.read(store::status_counts).await?;
        let all: Vec<(i32, u64)> = counts.iter().fold(Vec::new(), |mut all, (_, status, count)| {
            match all.iter_mut().find(|(s, _)| s == status) {
                Some((_, total)) => *total += count,
                None => all.push((*status, *count)),
            }
            all
        });
        let (total, by_status, success_rate) = figures(&all);
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
        Ok(Stats {
            total,
            by_status,
            success_rate,
            step_durations: self.inner.steps.snapshot(),
            compensation_failures: self.inner.compensation_failures.load(Ordering::Relaxed),
            by_mode,
            dead_letters: self.inner.dead_letters.load(Ordering::Relaxed),
        })
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

/// One `StreamTransaction`'s place in its saga.
struct Following {
    coordinator: Coordinator,
    transaction_id: String,
    watch: Watch,
    /// The state read when the watch began, until it is sent.
    current: Option<Transaction>,
    /// History entries the client has seen.
    seen: usize,
    /// A terminal state or an error was sent: nothing follows.
    ended: bool,
}

impl Following {
    /// The next update for the client, and where it leaves the watch.
    async fn next(mut self) -> Option<(Result<TransactionUpdate, CoordinatorError>, Following)> {
        if self.ended {
            return None;
        }
        if let Some(current) = self.current.take() {
            return Some((Ok(self.sent(current, 0)), self));
        }
        // Where replicas share the store, another coordinator may apply the
        // saga's events: read the state again now and then.
        let shared = self.coordinator.inner.store.shared();
        loop {
            let received = tokio::select! {
                received = self.watch.updates.recv() => received,
                _ = tokio::time::sleep(RESYNC_EVERY), if shared => {
                    Err(broadcast::error::RecvError::Lagged(0))
                }
            };
            let (transaction, event) = match received {
                Ok(changed) if changed.transaction.history.len() > self.seen => {
                    (Transaction::clone(&changed.transaction), changed.event as i32)
                }
                Ok(_) => continue,
                // Too slow for the changes (or time to look): read the state
                // again.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match self.coordinator.transaction(self.transaction_id.clone()).await {
                        Ok(transaction) if transaction.history.len() > self.seen => (transaction, 0),
                        Ok(_) => continue,
                        Err(e) => {
                            self.ended = true;
                            return Some((Err(e), self));
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            return Some((Ok(self.sent(transaction, event)), self));
        }
    }

    /// The update that tells the client of `transaction`, noted as seen.
    fn sent(&mut self, transaction: Transaction, event: i32) -> TransactionUpdate {
        self.seen = transaction.history.len();
        self.ended = view::is_terminal(transaction.status());
        TransactionUpdate {
            transaction: Some(transaction),
            event,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sagamesh_proto::v1::purchase_coordinator_client::PurchaseCoordinatorClient;
    use sagamesh_proto::v1::{SagaMode, StreamTransactionRequest, Transaction, TransactionStatus};
    use sagamesh_store::{Database, Durability};
    use tokio_stream::wrappers::TcpListenerStream;

    use crate::grpc::CoordinatorService;
    use crate::{Catalog, Coordinator, store};

    #[tokio::test]
    async fn a_watch_ends_when_its_client_goes_away_while_the_saga_stands_still() {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::Embedded {
            dir: dir.path().to_owned(),
            durability: Durability::Process,
        };
        let catalog =
            Catalog::remote(tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy());
        let coordinator = Coordinator::open(&database, catalog, SagaMode::Choreography, 100)
            .await
            .unwrap();
        let stuck = Transaction {
            transaction_id: "tx-1".into(),
            user_id: "user-1".into(),
            status: TransactionStatus::Compensating as i32,
            mode: SagaMode::Choreography as i32,
            ..Default::default()
        };
        coordinator
            .inner
            .store
            .write(move |tx| store::insert(tx, stuck.clone(), &[]).map(|_| ()))
            .await
            .unwrap();

        // A real client over gRPC, which goes away mid-stream.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(CoordinatorService::new(coordinator.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let mut client = PurchaseCoordinatorClient::connect(format!("http://{address}"))
            .await
            .unwrap();
        let request = StreamTransactionRequest {
            transaction_id: "tx-1".into(),
        };
        let mut updates = client.stream_transaction(request).await.unwrap().into_inner();
        assert!(
            updates.message().await.unwrap().is_some(),
            "the current state comes first"
        );
        assert!(coordinator.inner.watchers.watching("tx-1"));
        drop(updates);
        drop(client);

        let deadline = Instant::now() + Duration::from_secs(5);
        while coordinator.inner.watchers.watching("tx-1") {
            assert!(Instant::now() < deadline, "the watch outlived its client");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.abort();
    }
}
