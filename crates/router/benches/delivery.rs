//! One event through the router over real gRPC on loopback: published on
//! an attached stream, appended durably, delivered back to the same
//! instance's group, and acked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use sagamesh_log_sqlite::SqliteLog;
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::event_router_client::EventRouterClient;
use sagamesh_proto::v1::{
    Ack, AttachRequest, AttachResponse, Envelope, EventType, Hello, PublishRequest, PurchaseDetails,
    PurchaseInitiated, SagaMode, attach_request, attach_response,
};
use sagamesh_router::{Backend, Router, RouterConfig};
use sagamesh_store::Durability;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Streaming;
use tonic::transport::server::TcpIncoming;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn purchase_initiated() -> Envelope {
    let transaction = format!("tx-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    Envelope::new(
        &transaction,
        "",
        "bench",
        Payload::PurchaseInitiated(PurchaseInitiated {
            purchase: Some(PurchaseDetails {
                user_id: "user-1".into(),
                item_id: "item-1".into(),
                quantity: 1,
                unit_price: 100,
                total_price: 100,
                ..PurchaseDetails::default()
            }),
        }),
    )
}

struct Attached {
    outbound: mpsc::Sender<AttachRequest>,
    inbound: Streaming<AttachResponse>,
}

/// Publishes one event and waits for its delivery, then acks it.
async fn round_trip(attached: &mut Attached) {
    let publish = PublishRequest {
        request_id: 1,
        events: vec![purchase_initiated()],
    };
    attached
        .outbound
        .send(AttachRequest {
            kind: Some(attach_request::Kind::Publish(publish)),
        })
        .await
        .unwrap();
    loop {
        let message = attached.inbound.message().await.unwrap().unwrap();
        if let Some(attach_response::Kind::Deliveries(batch)) = message.kind {
            let delivery_ids = batch.deliveries.iter().map(|d| d.delivery_id).collect();
            attached
                .outbound
                .send(AttachRequest {
                    kind: Some(attach_request::Kind::Ack(Ack { delivery_ids })),
                })
                .await
                .unwrap();
            return;
        }
    }
}

fn delivery(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut attached = runtime.block_on(async {
        let log = SqliteLog::open(&dir.path().join("router.db"), Durability::Machine).unwrap();
        let config = RouterConfig::new(SagaMode::Choreography, sagamesh_saga::subscriptions());
        let tasks = TaskTracker::new();
        let router = Router::start(
            Backend::Embedded(Arc::new(log)),
            config,
            &tasks,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(router.service().into_server(None))
                .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let (outbound, rx) = mpsc::channel(64);
        let wallets = sagamesh_saga::subscription("wallets").unwrap();
        outbound
            .send(AttachRequest {
                kind: Some(attach_request::Kind::Hello(Hello {
                    service: "bench".into(),
                    group: "wallets".into(),
                    event_types: wallets
                        .event_types
                        .iter()
                        .map(|t: &EventType| *t as i32)
                        .collect(),
                    max_in_flight: 64,
                    instance_id: "bench".into(),
                    mode: SagaMode::Choreography as i32,
                    credentials: Vec::new(),
                    takes_publish_failed: true,
                })),
            })
            .await
            .unwrap();
        let inbound = EventRouterClient::new(channel)
            .attach(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Attached { outbound, inbound }
    });
    c.bench_function("router_publish_deliver_ack", |b| {
        b.iter(|| runtime.block_on(round_trip(&mut attached)))
    });
}

criterion_group!(benches, delivery);
criterion_main!(benches);
