//! One instance's attachment to the router, kept alive across router
//! restarts and broken connections.
//!
//! A single task owns the stream. Deliveries are handled concurrently (the
//! router bounds how many are in flight); their acks come back to the task
//! and leave in batches. A handler whose effects are committed before they
//! are durable has its deliveries reported processed first, and acked once
//! durable. Publishes ride the same stream and are answered by
//! request id. Acks of a stream that broke are dropped: the router delivers
//! that work again on the next stream.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sagamesh_proto::v1::event_router_client::EventRouterClient;
use sagamesh_proto::v1::{
    Ack, AttachRequest, AttachResponse, Envelope, EventType, Hello, Nack, Processed, PublishRequest,
    PublishResponse, SagaMode, attach_request, attach_response,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;

/// Messages waiting to go to the router. When full, acks and publishes wait.
const OUTBOUND_QUEUE: usize = 1024;
/// Publishes waiting for the connection task. When full, publishers wait.
const PUBLISH_QUEUE: usize = 256;
/// Finished deliveries waiting to be acked. When full, handlers wait.
const ACK_QUEUE: usize = 4096;
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How long a stop waits for deliveries in hand and the last publishes.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Handles one delivered event. `Ok` acks it; `Err` nacks it with the reason
/// (a transient error: the router delivers it again later). A business
/// failure is not an `Err`: it is a `*Failed` event in the outbox.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, event: Envelope, attempt: u32) -> BoxFuture<'_, Result<(), String>>;

    /// Like [`Handler::handle`], for a handler that may finish before its
    /// effects are durable: [`Handled::Committed`] has the delivery
    /// reported processed at once (the router may send the transaction's
    /// next event) and acked once durable. By default, `handle`.
    fn handle_staged(&self, event: Envelope, attempt: u32) -> BoxFuture<'_, Result<Handled, String>> {
        Box::pin(async move { self.handle(event, attempt).await.map(|()| Handled::Durable) })
    }
}

/// What a handler did with an event it took.
pub enum Handled {
    /// Its effects are durable: ack it.
    Durable,
    /// Its effects are committed (they survive the process, not yet the
    /// machine) and durable once this resolves; an `Err` nacks it.
    Committed(BoxFuture<'static, Result<(), String>>),
}

impl Handled {
    /// Waits until the effects are durable: a staged handler's `handle`.
    pub async fn durable(self) -> Result<(), String> {
        match self {
            Handled::Durable => Ok(()),
            Handled::Committed(durable) => durable.await,
        }
    }
}

/// Who this instance is and what it subscribes to.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    pub service: String,
    pub group: String,
    pub event_types: Vec<EventType>,
    pub max_in_flight: u32,
    pub mode: SagaMode,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the router: {0}")]
    Unreachable(String),
    #[error("the router refused this service: {0}")]
    Refused(String),
    #[error("the router did not confirm the publish: {0}")]
    Publish(String),
    /// The router refused the events themselves (`INVALID_ARGUMENT`):
    /// publishing them again changes nothing.
    #[error("the router refused the events: {0}")]
    PublishRefused(String),
    #[error("the router client has stopped")]
    Stopped,
}

struct PublishJob {
    events: Vec<Envelope>,
    reply: oneshot::Sender<Result<PublishResponse, ClientError>>,
}

/// Publishes over the instance's stream; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    jobs: mpsc::Sender<PublishJob>,
}

impl Publisher {
    /// Returns once the router has the events durably.
    pub async fn publish(&self, events: Vec<Envelope>) -> Result<PublishResponse, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(PublishJob { events, reply })
            .await
            .map_err(|_| ClientError::Stopped)?;
        answer.await.map_err(|_| ClientError::Stopped)?
    }
}

/// A running attachment.
pub struct RouterClient {
    publisher: Publisher,
    drained: CancellationToken,
}

/// A handler's answer for a delivery of stream `generation`.
enum Done {
    Processed(u64, u64),
    Ack(u64, u64),
    Nack(u64, u64, String),
}

struct Attached {
    outbound: mpsc::Sender<AttachRequest>,
    inbound: Inbound,
    /// Whether the router takes `Processed` (see `Welcome`).
    accepts_processed: bool,
}

/// What a router answers on an Attach stream.
pub type Inbound = Pin<Box<dyn Stream<Item = Result<AttachResponse, Status>> + Send>>;

/// Opens Attach streams to one router.
pub trait Attach: Send + Sync + 'static {
    /// Opens a stream that carries `outbound` to the router and returns
    /// the router's answers.
    fn attach(&self, outbound: ReceiverStream<AttachRequest>) -> BoxFuture<'_, Result<Inbound, Status>>;
}

/// The router a client attaches to: over gRPC, or in this process (see
/// [`RouterLink::new`]).
#[derive(Clone)]
pub struct RouterLink(Arc<dyn Attach>);

impl RouterLink {
    /// A link through any [`Attach`], such as a router in this process.
    pub fn new(attach: impl Attach) -> RouterLink {
        RouterLink(Arc::new(attach))
    }
}

impl RouterLink {
    /// A link over gRPC. With a `token` (the router's `--router-token`),
    /// every attach carries it as `authorization: Bearer <token>`; `Err`
    /// when the token cannot go in a gRPC header.
    pub fn grpc(channel: Channel, token: Option<&str>) -> Result<RouterLink, String> {
        let authorization = token
            .map(|token| {
                MetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| "the router token must be printable ASCII without spaces".to_owned())
            })
            .transpose()?;
        let client = EventRouterClient::new(channel)
            .max_decoding_message_size(sagamesh_proto::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(sagamesh_proto::MAX_MESSAGE_SIZE);
        Ok(RouterLink::new(Grpc {
            client,
            authorization,
        }))
    }
}

/// A router reached over gRPC.
struct Grpc {
    client: EventRouterClient<Channel>,
    /// `Bearer <token>`, for a router that requires its token.
    authorization: Option<MetadataValue<Ascii>>,
}

impl Attach for Grpc {
    fn attach(&self, outbound: ReceiverStream<AttachRequest>) -> BoxFuture<'_, Result<Inbound, Status>> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(outbound);
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        Box::pin(async move {
            let inbound = client.attach(request).await?.into_inner();
            Ok(Box::pin(inbound) as Inbound)
        })
    }
}

impl RouterClient {
    /// Attaches once (so a refusal, such as a mode mismatch, fails here with
    /// the router's reason) and then keeps the attachment alive on `tasks`.
    pub async fn start(
        router: impl Into<RouterLink>,
        config: HandlerConfig,
        handler: Arc<dyn Handler>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<RouterClient, ClientError> {
        let hello = Hello {
            service: config.service.clone(),
            group: config.group.clone(),
            event_types: config.event_types.iter().map(|t| *t as i32).collect(),
            max_in_flight: config.max_in_flight,
            instance_id: uuid::Uuid::now_v7().to_string(),
            mode: config.mode as i32,
            credentials: Vec::new(),
            takes_publish_failed: true,
        };
        let client = router.into();
        let first = attach(&client, &hello).await?;
        let (jobs, job_rx) = mpsc::channel(PUBLISH_QUEUE);
        let drained = CancellationToken::new();
        let connection = Connection {
            client,
            hello,
            handler,
            tasks: tasks.clone(),
            shutdown,
            drained: drained.clone(),
            jobs: job_rx,
            publishers_gone: false,
        };
        tasks.spawn(connection.run(first));
        Ok(RouterClient {
            publisher: Publisher { jobs },
            drained,
        })
    }

    /// Takes the publisher: the stream stays open on a stop until every
    /// publisher taken is dropped, so the holder can flush first.
    pub fn into_publisher(self) -> Publisher {
        self.publisher
    }

    /// Cancelled during a stop once no delivery is being handled: nothing
    /// more will be written to the outbox by this instance's handler.
    pub fn drained(&self) -> CancellationToken {
        self.drained.clone()
    }
}

async fn attach(router: &RouterLink, hello: &Hello) -> Result<Attached, ClientError> {
    let (outbound, rx) = mpsc::channel(OUTBOUND_QUEUE);
    outbound
        .send(AttachRequest {
            kind: Some(attach_request::Kind::Hello(hello.clone())),
        })
        .await
        .map_err(|_| ClientError::Stopped)?;
    let refused = |status: Status| match status.code() {
        Code::FailedPrecondition | Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated => {
            ClientError::Refused(status.message().to_owned())
        }
        _ => ClientError::Unreachable(status.message().to_owned()),
    };
    let mut inbound = router.0.attach(ReceiverStream::new(rx)).await.map_err(refused)?;
    match inbound.next().await.transpose().map_err(refused)? {
        Some(AttachResponse {
            kind: Some(attach_response::Kind::Welcome(welcome)),
        }) => Ok(Attached {
            outbound,
            inbound,
            accepts_processed: welcome.accepts_processed,
        }),
        _ => Err(ClientError::Unreachable(
            "the router did not welcome the hello".into(),
        )),
    }
}

struct Connection {
    client: RouterLink,
    hello: Hello,
    handler: Arc<dyn Handler>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Cancelled once no delivery is being handled any more during a stop:
    /// the relay's cue to flush the outbox one last time.
    drained: CancellationToken,
    jobs: mpsc::Receiver<PublishJob>,
    /// Every `Publisher` is gone (the relay finished): no publish can come.
    publishers_gone: bool,
}

/// What one stream ended with.
enum Ended {
    Broke,
    Stopped,
}

impl Connection {
    async fn run(mut self, first: Attached) {
        let mut attached = Some(first);
        let mut backoff = RECONNECT_MIN;
        let mut generation = 0u64;
        loop {
            let current = match attached.take() {
                Some(current) => current,
                None => {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    match attach(&self.client, &self.hello).await {
                        Ok(current) => current,
                        Err(e) => {
                            tracing::warn!(service = %self.hello.service, error = %e, "router attach failed; retrying");
                            backoff = (backoff * 2).min(RECONNECT_MAX);
                            continue;
                        }
                    }
                }
            };
            generation += 1;
            backoff = RECONNECT_MIN;
            let started = Instant::now();
            match self.serve(current, generation).await {
                Ended::Stopped => break,
                Ended::Broke => tracing::warn!(
                    service = %self.hello.service,
                    after_ms = started.elapsed().as_millis() as u64,
                    "router stream ended; reattaching"
                ),
            }
        }
        self.drained.cancel();
    }

    /// Serves one stream until it breaks, or until a stop has drained it:
    /// deliveries in hand are finished and acked, new ones are handed back
    /// (nacked), and the relay's last publishes are through.
    async fn serve(&mut self, attached: Attached, generation: u64) -> Ended {
        let Attached {
            outbound,
            mut inbound,
            accepts_processed,
        } = attached;
        let (done_tx, mut done_rx) = mpsc::channel::<Done>(ACK_QUEUE);
        let mut pending: HashMap<u64, oneshot::Sender<Result<PublishResponse, ClientError>>> = HashMap::new();
        let mut next_request = 1u64;
        let mut handling = 0usize;
        let mut handed_back = 0usize;
        let mut stop_by: Option<tokio::time::Instant> = None;
        let group = self.hello.group.clone();
        let ended = loop {
            if stop_by.is_some() {
                if handling == 0 {
                    self.drained.cancel();
                }
                if handling == 0 && self.publishers_gone && pending.is_empty() {
                    tracing::info!(
                        service = %self.hello.service,
                        handed_back,
                        "drained: deliveries in hand finished, the rest handed back, outbox flushed"
                    );
                    break Ended::Stopped;
                }
            }
            let deadline = stop_by.unwrap_or_else(|| tokio::time::Instant::now() + DRAIN_GRACE);
            tokio::select! {
                _ = self.shutdown.cancelled(), if stop_by.is_none() => {
                    stop_by = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                _ = tokio::time::sleep_until(deadline), if stop_by.is_some() => {
                    tracing::warn!(service = %self.hello.service, handling, "stop grace period over; closing the stream");
                    break Ended::Stopped;
                }
                message = inbound.next() => match message.transpose() {
                    Ok(Some(AttachResponse { kind: Some(kind) })) => match kind {
                        attach_response::Kind::Deliveries(batch) => {
                            for delivery in batch.deliveries {
                                if stop_by.is_some() {
                                    // Stopping: hand it back for another instance.
                                    handed_back += 1;
                                    let nack = Nack { delivery_id: delivery.delivery_id, reason: "the instance is stopping".into() };
                                    if outbound.send(AttachRequest { kind: Some(attach_request::Kind::Nack(nack)) }).await.is_err() {
                                        break;
                                    }
                                    continue;
                                }
                                let Some(envelope) = delivery.envelope else { continue };
                                let handler = self.handler.clone();
                                let done = done_tx.clone();
                                // Context for every line the handler logs, at
                                // `debug`: the step's own lines name the
                                // transaction, and a span per delivery costs
                                // `up` a few percent of its CPU at `info`.
                                let span = tracing::debug_span!(
                                    "delivery",
                                    tx_id = %envelope.transaction_id,
                                    event = envelope.event_type().as_str_name(),
                                    group = %group,
                                    attempt = delivery.attempt,
                                );
                                let (tx_id, event) = (envelope.transaction_id.clone(), envelope.event_type());
                                let id = delivery.delivery_id;
                                handling += 1;
                                self.tasks.spawn(async move {
                                    let outcome = match handler.handle_staged(envelope, delivery.attempt).await {
                                        Ok(Handled::Durable) => Ok(()),
                                        Ok(Handled::Committed(durable)) => {
                                            if accepts_processed {
                                                let _ = done.send(Done::Processed(generation, id)).await;
                                            }
                                            durable.await
                                        }
                                        Err(reason) => Err(reason),
                                    };
                                    let message = match outcome {
                                        Ok(()) => Done::Ack(generation, id),
                                        Err(reason) => {
                                            tracing::warn!(
                                                %tx_id,
                                                event = event.as_str_name(),
                                                attempt = delivery.attempt,
                                                reason = %reason,
                                                "handler failed; nacking"
                                            );
                                            Done::Nack(generation, id, reason)
                                        }
                                    };
                                    let _ = done.send(message).await;
                                }.instrument(span));
                            }
                        }
                        attach_response::Kind::Published(response) => {
                            if let Some(reply) = pending.remove(&response.request_id) {
                                let _ = reply.send(Ok(response));
                            }
                        }
                        attach_response::Kind::PublishFailed(failed) => {
                            if let Some(reply) = pending.remove(&failed.request_id) {
                                let error = if failed.code == Code::InvalidArgument as i32 {
                                    ClientError::PublishRefused(failed.message)
                                } else {
                                    ClientError::Publish(failed.message)
                                };
                                let _ = reply.send(Err(error));
                            }
                        }
                        attach_response::Kind::Welcome(_) => {}
                    },
                    Ok(Some(AttachResponse { kind: None })) => {}
                    Ok(None) => break Ended::Broke,
                    Err(status) => {
                        // The stream broke: the publishes it carried may or
                        // may not have been taken.
                        for (_, reply) in pending.drain() {
                            let _ = reply.send(Err(ClientError::Publish(status.message().to_owned())));
                        }
                        break Ended::Broke;
                    }
                },
                Some(first) = done_rx.recv() => {
                    let mut processed = Vec::new();
                    let mut acks = Vec::new();
                    let mut nacks = Vec::new();
                    let mut collect = |done: Done| match done {
                        Done::Processed(g, id) if g == generation => processed.push(id),
                        Done::Ack(g, id) if g == generation => acks.push(id),
                        Done::Nack(g, id, reason) if g == generation => nacks.push((id, reason)),
                        _ => {}
                    };
                    collect(first);
                    while let Ok(more) = done_rx.try_recv() {
                        collect(more);
                    }
                    handling = handling.saturating_sub(acks.len() + nacks.len());
                    let answered_some = !acks.is_empty() || !nacks.is_empty();
                    if !processed.is_empty() && answered_some {
                        // Answered in full already: the ack (or nack) says it all.
                        let answered: std::collections::HashSet<u64> =
                            acks.iter().copied().chain(nacks.iter().map(|(id, _)| *id)).collect();
                        processed.retain(|id| !answered.contains(id));
                    }
                    if !processed.is_empty() {
                        let processed = AttachRequest { kind: Some(attach_request::Kind::Processed(Processed { delivery_ids: processed })) };
                        if outbound.send(processed).await.is_err() { break Ended::Broke; }
                    }
                    if !acks.is_empty() {
                        let ack = AttachRequest { kind: Some(attach_request::Kind::Ack(Ack { delivery_ids: acks })) };
                        if outbound.send(ack).await.is_err() { break Ended::Broke; }
                    }
                    for (delivery_id, reason) in nacks {
                        let nack = AttachRequest { kind: Some(attach_request::Kind::Nack(Nack { delivery_id, reason })) };
                        if outbound.send(nack).await.is_err() { break; }
                    }
                }
                job = self.jobs.recv(), if !self.publishers_gone => match job {
                    Some(job) => {
                        let request_id = next_request;
                        next_request += 1;
                        pending.insert(request_id, job.reply);
                        let publish = AttachRequest {
                            kind: Some(attach_request::Kind::Publish(PublishRequest { request_id, events: job.events })),
                        };
                        if outbound.send(publish).await.is_err() { break Ended::Broke; }
                    }
                    None => self.publishers_gone = true,
                },
            }
        };
        for (_, reply) in pending.drain() {
            let _ = reply.send(Err(ClientError::Publish("the router stream broke".into())));
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use sagamesh_proto::v1::{Deliveries, Delivery, Welcome};

    use super::*;

    /// A router in the test's hands: what the client sends arrives on
    /// `sent`, and what the test pushes into the returned sender reaches
    /// the client.
    struct FakeRouter {
        streams: Mutex<Option<Streams>>,
    }

    /// The stream to the client, and where the client's stream goes.
    type Streams = (
        ReceiverStream<AttachResponseResult>,
        oneshot::Sender<ReceiverStream<AttachRequest>>,
    );

    type AttachResponseResult = Result<AttachResponse, Status>;

    impl Attach for FakeRouter {
        fn attach(&self, outbound: ReceiverStream<AttachRequest>) -> BoxFuture<'_, Result<Inbound, Status>> {
            let taken = self.streams.lock().unwrap().take();
            Box::pin(async move {
                let (inbound, sent) = taken.ok_or_else(|| Status::unavailable("attached once already"))?;
                let _ = sent.send(outbound);
                Ok(Box::pin(inbound) as Inbound)
            })
        }
    }

    /// Commits at once; durable when the test says so.
    struct Staged {
        durable: Mutex<Option<oneshot::Receiver<()>>>,
    }

    impl Handler for Staged {
        fn handle(&self, _event: Envelope, _attempt: u32) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async { Err("only handle_staged is used".to_owned()) })
        }

        fn handle_staged(&self, _event: Envelope, _attempt: u32) -> BoxFuture<'_, Result<Handled, String>> {
            let durable = self.durable.lock().unwrap().take().expect("one delivery");
            Box::pin(async move {
                Ok(Handled::Committed(Box::pin(async move {
                    durable.await.map_err(|_| "the sync failed".to_owned())
                })))
            })
        }
    }

    /// A client attached to a fake router whose welcome says whether it
    /// takes `Processed`, holding one delivery whose handler committed it.
    struct OneDelivery {
        /// What the client sent after its hello.
        sent: ReceiverStream<AttachRequest>,
        /// Makes the delivery's effects durable.
        make_durable: oneshot::Sender<()>,
        /// Keeps the stream to the client open.
        _to_client: mpsc::Sender<AttachResponseResult>,
        shutdown: CancellationToken,
    }

    async fn one_committed_delivery(accepts_processed: bool) -> OneDelivery {
        let (to_client, inbound) = mpsc::channel::<AttachResponseResult>(8);
        let (sent_tx, sent_rx) = oneshot::channel();
        let router = RouterLink::new(FakeRouter {
            streams: Mutex::new(Some((ReceiverStream::new(inbound), sent_tx))),
        });
        let (make_durable, durable) = oneshot::channel();
        let handler = Arc::new(Staged {
            durable: Mutex::new(Some(durable)),
        });
        let welcome = Welcome {
            accepts_processed,
            ..Welcome::default()
        };
        to_client
            .send(Ok(AttachResponse {
                kind: Some(attach_response::Kind::Welcome(welcome)),
            }))
            .await
            .unwrap();
        let (tasks, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let config = HandlerConfig {
            service: "coordinator".into(),
            group: "coordinator".into(),
            event_types: vec![EventType::PurchaseInitiated],
            max_in_flight: 8,
            mode: SagaMode::Choreography,
        };
        RouterClient::start(router, config, handler, &tasks, shutdown.clone())
            .await
            .unwrap();
        let mut sent = sent_rx.await.unwrap();
        assert!(matches!(
            sent.next().await,
            Some(AttachRequest {
                kind: Some(attach_request::Kind::Hello(_))
            })
        ));
        let delivery = Delivery {
            delivery_id: 7,
            attempt: 1,
            envelope: Some(Envelope::default()),
        };
        to_client
            .send(Ok(AttachResponse {
                kind: Some(attach_response::Kind::Deliveries(Deliveries {
                    deliveries: vec![delivery],
                })),
            }))
            .await
            .unwrap();
        OneDelivery {
            sent,
            make_durable,
            _to_client: to_client,
            shutdown,
        }
    }

    #[tokio::test]
    async fn a_committed_delivery_is_reported_processed_and_acked_once_durable() {
        let mut attached = one_committed_delivery(true).await;
        match attached.sent.next().await {
            Some(AttachRequest {
                kind: Some(attach_request::Kind::Processed(processed)),
            }) => assert_eq!(processed.delivery_ids, vec![7]),
            other => panic!("expected the delivery reported processed, got {other:?}"),
        }
        attached.make_durable.send(()).unwrap();
        match attached.sent.next().await {
            Some(AttachRequest {
                kind: Some(attach_request::Kind::Ack(ack)),
            }) => assert_eq!(ack.delivery_ids, vec![7]),
            other => panic!("expected the delivery acked once durable, got {other:?}"),
        }
        attached.shutdown.cancel();
    }

    /// The test runtime has one thread, so the handler's task reports the
    /// delivery processed and then acked (its sync done already) before the
    /// client's loop reads either: both leave in the same round.
    #[tokio::test]
    async fn a_delivery_durable_before_it_is_reported_is_only_acked() {
        make_durable_and_expect_only_the_ack(one_committed_delivery(true).await).await;
    }

    #[tokio::test]
    async fn a_router_that_does_not_take_processed_only_gets_the_ack() {
        make_durable_and_expect_only_the_ack(one_committed_delivery(false).await).await;
    }

    /// Makes the delivery durable at once: the next message out is its ack,
    /// with no processed report before it.
    async fn make_durable_and_expect_only_the_ack(mut attached: OneDelivery) {
        attached.make_durable.send(()).unwrap();
        match attached.sent.next().await {
            Some(AttachRequest {
                kind: Some(attach_request::Kind::Ack(ack)),
            }) => assert_eq!(ack.delivery_ids, vec![7]),
            other => panic!("expected only the ack, got {other:?}"),
        }
        attached.shutdown.cancel();
    }
}
