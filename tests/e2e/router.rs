//! The router's delivery contract, driven by raw Attach streams against a
//! router process: per-transaction order, redelivery after the ack deadline
//! and after a broken stream, dead letters, refused hellos and refused
//! publishes, and an outbox relay that meets one.

use std::collections::VecDeque;
use std::time::Duration;

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::event_router_client::EventRouterClient;
use sagamesh_proto::v1::{
    Ack, AttachRequest, AttachResponse, Delivery, DiscardDeadLetterRequest, Envelope, EventType,
    GetDeadLetterRequest, Hello, ListDeadLettersRequest, Nack, Processed, PublishRequest, PublishResponse,
    PurchaseDetails, PurchaseInitiated, ReplayDeadLetterRequest, SagaMode, Step, attach_request,
    attach_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::support::{DEADLINE, Process, eventually, on_both_backends};

struct Instance {
    outbound: mpsc::Sender<AttachRequest>,
    inbound: Streaming<AttachResponse>,
    /// Deliveries received in a batch and not yet taken.
    buffered: VecDeque<Delivery>,
    /// What the router's welcome said about `Processed`.
    accepts_processed: bool,
}

fn hello(group: &str, types: &[EventType], mode: SagaMode) -> Hello {
    Hello {
        service: "test".into(),
        group: group.into(),
        event_types: types.iter().map(|t| *t as i32).collect(),
        max_in_flight: 10,
        instance_id: "test".into(),
        mode: mode as i32,
        credentials: vec![],
        takes_publish_failed: true,
    }
}

const WALLETS: [EventType; 3] = [
    EventType::PurchaseInitiated,
    EventType::ExecuteUserValidation,
    EventType::CompensateUserValidation,
];

async fn attach(client: &EventRouterClient<Channel>, hello: Hello) -> Result<Instance, tonic::Status> {
    let (outbound, rx) = mpsc::channel(16);
    outbound
        .send(AttachRequest {
            kind: Some(attach_request::Kind::Hello(hello)),
        })
        .await
        .unwrap();
    let mut inbound = client.clone().attach(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(AttachResponse {
            kind: Some(attach_response::Kind::Welcome(welcome)),
        }) => Ok(Instance {
            outbound,
            inbound,
            buffered: VecDeque::new(),
            accepts_processed: welcome.accepts_processed,
        }),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

impl Instance {
    /// The next delivery, within the deadline.
    async fn next(&mut self) -> Delivery {
        loop {
            if let Some(delivery) = self.buffered.pop_front() {
                return delivery;
            }
            let message = tokio::time::timeout(DEADLINE, self.inbound.message())
                .await
                .expect("a delivery within the deadline")
                .expect("stream ok")
                .expect("stream open");
            if let Some(attach_response::Kind::Deliveries(batch)) = message.kind {
                self.buffered.extend(batch.deliveries);
            }
        }
    }

    /// Nothing arrives for a while (used only to show an event is held back).
    async fn quiet_for(&mut self, window: Duration) {
        assert!(
            self.buffered.is_empty(),
            "expected nothing, have {:?}",
            self.buffered
        );
        if let Ok(message) = tokio::time::timeout(window, self.inbound.message()).await {
            panic!("expected nothing, got {message:?}");
        }
    }

    /// Closes the sending side (acks sent so far still arrive) and waits
    /// until the router ends the stream.
    async fn close(self) {
        let Instance {
            outbound,
            mut inbound,
            ..
        } = self;
        drop(outbound);
        let drained = async { while let Ok(Some(_)) = inbound.message().await {} };
        tokio::time::timeout(DEADLINE, drained)
            .await
            .expect("the router ends a closed stream");
    }

    /// Publishes `events` on this stream, as request `request_id`.
    async fn publish_on_stream(&self, request_id: u64, events: Vec<Envelope>) {
        self.send(attach_request::Kind::Publish(PublishRequest {
            request_id,
            events,
        }))
        .await;
    }

    /// The router's next answer to a publish on this stream, or the status
    /// the stream ended with; deliveries that come first are kept for
    /// [`Instance::next`].
    async fn publish_answer(&mut self) -> Result<attach_response::Kind, tonic::Status> {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.inbound.message())
                .await
                .expect("an answer within the deadline")?
                .expect("stream open");
            match message.kind {
                Some(attach_response::Kind::Deliveries(batch)) => self.buffered.extend(batch.deliveries),
                Some(
                    answer @ (attach_response::Kind::Published(_) | attach_response::Kind::PublishFailed(_)),
                ) => {
                    return Ok(answer);
                }
                _ => {}
            }
        }
    }

    async fn send(&self, kind: attach_request::Kind) {
        self.outbound
            .send(AttachRequest { kind: Some(kind) })
            .await
            .unwrap();
    }

    async fn ack(&self, delivery: &Delivery) {
        let ack = Ack {
            delivery_ids: vec![delivery.delivery_id],
        };
        self.send(attach_request::Kind::Ack(ack)).await;
    }

    async fn processed(&self, delivery: &Delivery) {
        let processed = Processed {
            delivery_ids: vec![delivery.delivery_id],
        };
        self.send(attach_request::Kind::Processed(processed)).await;
    }

    async fn nack(&self, delivery: &Delivery) {
        let nack = Nack {
            delivery_id: delivery.delivery_id,
            reason: "test says no".into(),
        };
        self.send(attach_request::Kind::Nack(nack)).await;
    }
}

fn event(tx: &str, payload: Payload) -> Envelope {
    Envelope::new(tx, "", "test", payload)
}

/// A purchase as `Purchase` records it: the router takes no event without one.
fn purchase() -> PurchaseDetails {
    PurchaseDetails {
        user_id: "user-1".into(),
        item_id: "item-1".into(),
        quantity: 1,
        unit_price: 100,
        total_price: 100,
        mode: SagaMode::Choreography as i32,
    }
}

fn initiated(tx: &str) -> Envelope {
    event(
        tx,
        Payload::PurchaseInitiated(PurchaseInitiated {
            purchase: Some(purchase()),
        }),
    )
}

/// An event whose id is written in capitals, which the router refuses.
fn shouted(tx: &str) -> Envelope {
    let mut event = initiated(tx);
    event.event_id = event.event_id.to_uppercase();
    event
}

fn refund(tx: &str) -> Envelope {
    event(
        tx,
        sagamesh_saga::compensation_request(Step::UserValidation, purchase(), 1),
    )
}

async fn publish(client: &EventRouterClient<Channel>, events: Vec<Envelope>) -> PublishResponse {
    client
        .clone()
        .publish(PublishRequest {
            request_id: 0,
            events,
        })
        .await
        .expect("publish")
        .into_inner()
}

fn router(dir: &std::path::Path, extra: &[&str]) -> (Process, EventRouterClient<Channel>) {
    let mut args = vec!["router", "--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let process = Process::start("router", &args, &[]);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", process.address))
        .unwrap()
        .connect_lazy();
    (process, EventRouterClient::new(channel))
}

async fn events_of_a_transaction_go_out_in_order_and_again_when_not_acked() {
    let dir = tempfile::tempdir().unwrap();
    let (_router, client) = router(dir.path(), &["--ack-deadline-ms", "300"]);
    let mut a = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    let (first, second, other) = (initiated("tx-1"), refund("tx-1"), initiated("tx-2"));
    publish(&client, vec![first.clone(), second.clone(), other.clone()]).await;

    let mut got = [a.next().await, a.next().await];
    got.sort_by_key(|d| d.envelope.as_ref().unwrap().transaction_id.clone());
    assert_eq!(
        got[0].envelope.as_ref().unwrap().event_id,
        first.event_id,
        "tx-1's first event"
    );
    assert_eq!(
        got[1].envelope.as_ref().unwrap().event_id,
        other.event_id,
        "tx-2 does not wait for tx-1"
    );
    a.quiet_for(Duration::from_millis(100)).await;

    // Acking tx-1's first event releases its second; tx-2's event, never
    // acked, goes out again after the deadline as attempt 2.
    a.ack(&got[0]).await;
    let mut later = [a.next().await, a.next().await];
    later.sort_by_key(|d| d.envelope.as_ref().unwrap().transaction_id.clone());
    assert_eq!(later[0].envelope.as_ref().unwrap().event_id, second.event_id);
    assert_eq!(later[0].attempt, 1);
    assert_eq!(later[1].envelope.as_ref().unwrap().event_id, other.event_id);
    assert_eq!(later[1].attempt, 2, "redelivered after the ack deadline");
    a.ack(&later[1]).await;

    // A stream that ends hands its unacked work to the next instance.
    a.close().await;
    let mut b = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    let again = b.next().await;
    assert_eq!(again.envelope.as_ref().unwrap().event_id, second.event_id);
    assert!(again.attempt >= 2, "attempt {}", again.attempt);
    b.ack(&again).await;
    b.quiet_for(Duration::from_millis(400)).await;
}

async fn a_processed_event_releases_the_next_and_comes_back_first_when_never_acked() {
    let dir = tempfile::tempdir().unwrap();
    let (_router, client) = router(dir.path(), &[]);
    let mut a = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    assert!(
        a.accepts_processed,
        "the router's welcome offers the two-step ack"
    );
    let (first, second) = (initiated("tx-1"), refund("tx-1"));
    publish(&client, vec![first.clone(), second.clone()]).await;

    // Reported processed, the first event lets the second go out unacked.
    let one = a.next().await;
    assert_eq!(one.envelope.as_ref().unwrap().event_id, first.event_id);
    a.processed(&one).await;
    let two = a.next().await;
    assert_eq!(two.envelope.as_ref().unwrap().event_id, second.event_id);

    // The stream ends before either is acked: the next instance gets both
    // again, the processed one first and the other only after it.
    a.close().await;
    let mut b = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    let again = b.next().await;
    assert_eq!(again.envelope.as_ref().unwrap().event_id, first.event_id);
    assert_eq!(again.attempt, 2);
    b.quiet_for(Duration::from_millis(200)).await;
    b.ack(&again).await;
    let then = b.next().await;
    assert_eq!(then.envelope.as_ref().unwrap().event_id, second.event_id);
    b.ack(&then).await;
    b.quiet_for(Duration::from_millis(200)).await;
}

async fn a_group_shares_its_events_among_instances() {
    let dir = tempfile::tempdir().unwrap();
    let (_router, client) = router(dir.path(), &[]);
    let mut a = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    let mut b = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    publish(&client, (0..4).map(|i| initiated(&format!("tx-{i}"))).collect()).await;
    for _ in 0..2 {
        let (da, db) = (a.next().await, b.next().await);
        a.ack(&da).await;
        b.ack(&db).await;
    }
}

async fn an_event_that_keeps_failing_becomes_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let (_router, client) = router(dir.path(), &["--max-attempts", "2"]);
    let mut a = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    let (poison, next) = (initiated("tx-poison"), refund("tx-poison"));
    publish(&client, vec![poison.clone(), next.clone()]).await;
    for attempt in 1..=2 {
        let delivery = a.next().await;
        assert_eq!(delivery.envelope.as_ref().unwrap().event_id, poison.event_id);
        assert_eq!(delivery.attempt, attempt);
        a.nack(&delivery).await;
    }
    // Dead-lettered, the transaction moves on to its next event.
    let moved_on = a.next().await;
    assert_eq!(moved_on.envelope.as_ref().unwrap().event_id, next.event_id);
    a.ack(&moved_on).await;

    let letters = eventually("the dead letter to be listed", || {
        let mut client = client.clone();
        async move {
            let letters = client
                .list_dead_letters(ListDeadLettersRequest {
                    group: "wallets".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .dead_letters;
            (!letters.is_empty()).then_some(letters)
        }
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 2);
    assert_eq!(letters[0].last_error, "test says no");
    assert_eq!(letters[0].envelope.as_ref().unwrap().event_id, poison.event_id);

    let id = letters[0].id;
    let inspected = client
        .clone()
        .get_dead_letter(GetDeadLetterRequest { id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inspected, letters[0], "a dead letter can be inspected on its own");

    // Replay: delivered again with a fresh attempt count; an ack removes it.
    client
        .clone()
        .replay_dead_letter(ReplayDeadLetterRequest { id })
        .await
        .unwrap();
    let replayed = a.next().await;
    assert_eq!(replayed.envelope.as_ref().unwrap().event_id, poison.event_id);
    assert_eq!(replayed.attempt, 1);
    a.ack(&replayed).await;
    eventually("the replayed dead letter to be removed", || {
        let mut client = client.clone();
        async move {
            let left = client
                .list_dead_letters(ListDeadLettersRequest::default())
                .await
                .unwrap()
                .into_inner()
                .dead_letters;
            left.is_empty().then_some(())
        }
    })
    .await;
    let gone = client
        .clone()
        .discard_dead_letter(DiscardDeadLetterRequest { id })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let unknown = client
        .clone()
        .replay_dead_letter(ReplayDeadLetterRequest { id: 999 })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let unknown = client
        .clone()
        .get_dead_letter(GetDeadLetterRequest { id: 999 })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

async fn hellos_that_do_not_fit_the_mesh_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_router, client) = router(dir.path(), &[]);
    let wrong_mode = attach(&client, hello("wallets", &WALLETS, SagaMode::Orchestration))
        .await
        .err()
        .unwrap();
    assert_eq!(wrong_mode.code(), Code::FailedPrecondition);
    assert!(
        wrong_mode.message().contains("choreography mode"),
        "{}",
        wrong_mode.message()
    );
    let unknown = attach(&client, hello("payments", &WALLETS, SagaMode::Choreography))
        .await
        .err()
        .unwrap();
    assert_eq!(unknown.code(), Code::FailedPrecondition);
    assert!(unknown.message().contains("payments"), "{}", unknown.message());
    let wrong_types = attach(
        &client,
        hello("wallets", &[EventType::ItemGranted], SagaMode::Choreography),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(wrong_types.code(), Code::FailedPrecondition);
    let mut greedy = hello("wallets", &WALLETS, SagaMode::Choreography);
    greedy.max_in_flight = 0;
    assert_eq!(
        attach(&client, greedy).await.err().unwrap().code(),
        Code::InvalidArgument
    );
}

async fn acknowledged_events_survive_a_router_crash_and_unacked_ones_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut router_process, client) = router(dir.path(), &[]);
    let mut a = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    let (done, pending) = (initiated("tx-done"), initiated("tx-pending"));
    publish(&client, vec![done.clone(), pending.clone()]).await;
    let (x, y) = (a.next().await, a.next().await);
    let acked = if x.envelope.as_ref().unwrap().event_id == done.event_id {
        x
    } else {
        y
    };
    a.ack(&acked).await;
    // Give the ack a moment to reach the router before the crash; whether it
    // did or not, the event must come back at most (at least once).
    let _ = tokio::time::timeout(Duration::from_millis(200), a.inbound.message()).await;
    router_process.kill();
    drop(a);

    let (_again, client) = router(dir.path(), &[]);
    let mut b = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let delivery = b.next().await;
        let id = delivery.envelope.as_ref().unwrap().event_id.clone();
        b.ack(&delivery).await;
        let finished = id == pending.event_id;
        seen.push(id);
        if finished {
            break;
        }
    }
    assert!(
        seen.contains(&pending.event_id),
        "the unacked event was delivered again after the crash"
    );

    // The new router knows the events it holds: publishing them again (as
    // a publisher does that never heard they were stored) adds nothing,
    // and an event published after the restart gets through.
    let repeated = publish(&client, vec![done.clone(), pending.clone()]).await;
    assert_eq!(
        (repeated.accepted, repeated.duplicates),
        (0, 2),
        "events stored before the crash are duplicates after it"
    );
    let fresh = initiated("tx-fresh");
    publish(&client, vec![fresh.clone()]).await;
    loop {
        let delivery = b.next().await;
        b.ack(&delivery).await;
        let id = &delivery.envelope.as_ref().unwrap().event_id;
        assert_ne!(*id, pending.event_id, "an acked event came back");
        if *id == fresh.event_id {
            break;
        }
    }
}

async fn a_refused_publish_is_answered_alone_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_router, client) = router(dir.path(), &[]);
    let mut a = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();
    let held = initiated("tx-held");
    publish(&client, vec![held.clone()]).await;
    let in_flight = a.next().await;

    a.publish_on_stream(7, vec![shouted("tx-shouted")]).await;
    let Ok(attach_response::Kind::PublishFailed(refused)) = a.publish_answer().await else {
        panic!("the uppercase id is refused");
    };
    assert_eq!(
        (refused.request_id, refused.code),
        (7, Code::InvalidArgument as i32)
    );
    assert!(refused.message.contains("lowercase"), "{}", refused.message);

    let good = initiated("tx-good");
    a.publish_on_stream(8, vec![good.clone()]).await;
    let Ok(attach_response::Kind::Published(published)) = a.publish_answer().await else {
        panic!("the next publish on the same stream is taken");
    };
    assert_eq!((published.request_id, published.accepted), (8, 1));
    // The stream lived on: the delivery in flight before the refusal is
    // acked on it and never comes again, and the new event arrives.
    a.ack(&in_flight).await;
    let next = a.next().await;
    assert_eq!(next.envelope.as_ref().unwrap().event_id, good.event_id);
    a.ack(&next).await;
    a.quiet_for(Duration::from_millis(500)).await;

    // An instance that does not say it takes `PublishFailed` (a client
    // built before it) has its stream ended instead, as it always had.
    let older = Hello {
        takes_publish_failed: false,
        ..hello("wallets", &WALLETS, SagaMode::Choreography)
    };
    let mut b = attach(&client, older).await.unwrap();
    b.publish_on_stream(9, vec![shouted("tx-shouted-again")]).await;
    let status = b
        .publish_answer()
        .await
        .expect_err("the stream ends with the refusal");
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// A service's outbox holding an event the router refuses: the relay sets
/// it aside and the events behind it still go out.
async fn an_outbox_event_the_router_refuses_does_not_hold_back_the_rest() {
    use sagamesh_router_client::{
        HandlerConfig, OUTBOX_MIGRATION, OUTBOX_WRITER_MIGRATION, OutboxRelay, RouterClient, RouterLink,
        push_outbox,
    };
    use sagamesh_store::{Durability, Store};

    let dir = tempfile::tempdir().unwrap();
    let (router_process, client) = router(dir.path(), &[]);
    let mut consumer = attach(&client, hello("wallets", &WALLETS, SagaMode::Choreography))
        .await
        .unwrap();

    let store = Store::open(
        &dir.path().join("publisher.db"),
        Durability::Machine,
        &[OUTBOX_MIGRATION, OUTBOX_WRITER_MIGRATION],
    )
    .unwrap();
    let (before, after) = (initiated("tx-before"), initiated("tx-after"));
    let mut free = initiated("tx-free");
    if let Some(Payload::PurchaseInitiated(initiated)) = &mut free.payload {
        initiated.purchase.as_mut().unwrap().total_price = 0;
    }
    let rows = vec![before.clone(), free, after.clone()];
    store
        .write(move |tx| {
            for event in &rows {
                push_outbox(tx, event)?;
            }
            Ok::<_, sagamesh_store::StoreError>(())
        })
        .await
        .unwrap();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", router_process.address))
        .unwrap()
        .connect_lazy();
    let tasks = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = RouterClient::start(
        RouterLink::grpc(channel, None).unwrap(),
        HandlerConfig {
            service: "publisher".into(),
            group: String::new(),
            event_types: Vec::new(),
            max_in_flight: 1,
            mode: SagaMode::Choreography,
        },
        std::sync::Arc::new(NoDeliveries),
        &tasks,
        stop.clone(),
    )
    .await
    .unwrap()
    .into_publisher();
    OutboxRelay::new().start(store, publisher, &tasks, stop.clone());

    let mut delivered = Vec::new();
    for _ in 0..2 {
        let delivery = consumer.next().await;
        delivered.push(delivery.envelope.as_ref().unwrap().event_id.clone());
        consumer.ack(&delivery).await;
    }
    delivered.sort();
    let mut expected = vec![before.event_id, after.event_id];
    expected.sort();
    assert_eq!(delivered, expected, "both valid events, and only those");
    consumer.quiet_for(Duration::from_millis(500)).await;
    stop.cancel();
    tasks.close();
    tokio::time::timeout(DEADLINE, tasks.wait())
        .await
        .expect("the relay stops");
}

/// A publish-only instance's handler: it subscribes to nothing.
struct NoDeliveries;

impl sagamesh_router_client::Handler for NoDeliveries {
    fn handle(
        &self,
        _event: Envelope,
        _attempt: u32,
    ) -> sagamesh_router_client::BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("a publish-only instance takes no deliveries".to_owned()) })
    }
}

on_both_backends!(
    events_of_a_transaction_go_out_in_order_and_again_when_not_acked,
    a_processed_event_releases_the_next_and_comes_back_first_when_never_acked,
    a_group_shares_its_events_among_instances,
    an_event_that_keeps_failing_becomes_a_dead_letter,
    hellos_that_do_not_fit_the_mesh_are_refused,
    acknowledged_events_survive_a_router_crash_and_unacked_ones_come_back,
    a_refused_publish_is_answered_alone_and_the_stream_goes_on,
    an_outbox_event_the_router_refuses_does_not_hold_back_the_rest,
);
