//! Appending to the router's log: one event alone (a commit and its fsync
//! each), and 64 concurrent one-event appends that share commits (group
//! commit), with the default durable settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sagamesh_log::{EventLog, StoredEvent};
use sagamesh_log_sqlite::SqliteLog;
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Envelope, PurchaseDetails, PurchaseInitiated};
use sagamesh_store::Durability;

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A new event at the next offset, as the router's sequencer numbers it.
fn event() -> StoredEvent {
    let offset = NEXT.fetch_add(1, Ordering::Relaxed);
    let transaction = format!("tx-{offset}");
    let envelope = Arc::new(Envelope::new(
        &transaction,
        "",
        "bench",
        Payload::PurchaseInitiated(PurchaseInitiated {
            purchase: Some(PurchaseDetails {
                user_id: "user-123".into(),
                item_id: "item-sword".into(),
                quantity: 1,
                unit_price: 100,
                total_price: 100,
                mode: 1,
            }),
        }),
    ));
    StoredEvent { offset, envelope }
}

fn append(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(SqliteLog::open(&dir.path().join("router.db"), Durability::Machine).unwrap());

    let mut group = c.benchmark_group("log_append");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_event_alone", |b| {
        b.to_async(&runtime).iter(|| {
            let log = log.clone();
            async move { log.append(vec![event()]).await.unwrap() }
        })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_concurrent_appends_group_commit", |b| {
        b.to_async(&runtime).iter(|| {
            let log = log.clone();
            async move {
                let appends: Vec<_> = (0..64)
                    .map(|_| {
                        let log = log.clone();
                        tokio::spawn(async move { log.append(vec![event()]).await.unwrap() })
                    })
                    .collect();
                for append in appends {
                    append.await.unwrap();
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
