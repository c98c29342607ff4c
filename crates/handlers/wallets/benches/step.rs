//! One user-validation step with its outbox write, through the same frame
//! the service runs (claim, business change, outbox event, one commit):
//! alone, and 64 at once sharing commits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Envelope, PurchaseDetails, PurchaseInitiated};
use sagamesh_router_client::Handler;
use sagamesh_saga::Faults;
use sagamesh_store::{Database, Durability};
use sagamesh_wallets::{UserValidation, Wallets};

static NEXT: AtomicU64 = AtomicU64::new(0);

fn purchase_initiated() -> Envelope {
    let transaction = format!("tx-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    Envelope::new(
        &transaction,
        "",
        "bench",
        Payload::PurchaseInitiated(PurchaseInitiated {
            purchase: Some(PurchaseDetails {
                user_id: "whale".into(),
                item_id: "coin".into(),
                quantity: 1,
                unit_price: 1,
                total_price: 1,
                mode: 1,
            }),
        }),
    )
}

fn step(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wallets = Wallets::open(&Database::Embedded {
        dir: dir.path().to_owned(),
        durability: Durability::Machine,
    })
    .unwrap();
    runtime
        .block_on(wallets.create_user("whale".into(), 1 << 50))
        .unwrap();
    let handler = Arc::new(sagamesh_step::handler(
        Arc::new(UserValidation),
        wallets.store(),
        Faults::default(),
    ));

    let mut group = c.benchmark_group("handler_step");
    group.throughput(Throughput::Elements(1));
    group.bench_function("user_validation_alone", |b| {
        b.to_async(&runtime).iter(|| {
            let handler = handler.clone();
            async move { handler.handle(purchase_initiated(), 1).await.unwrap() }
        })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_concurrent_steps_group_commit", |b| {
        b.to_async(&runtime).iter(|| {
            let handler = handler.clone();
            async move {
                let steps: Vec<_> = (0..64)
                    .map(|_| {
                        let handler = handler.clone();
                        tokio::spawn(async move { handler.handle(purchase_initiated(), 1).await.unwrap() })
                    })
                    .collect();
                for step in steps {
                    step.await.unwrap();
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
