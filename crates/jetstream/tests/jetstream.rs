//! The JetStream backend against the NATS server on this machine
//! (`SAGAMESH_TEST_NATS`, default `nats://127.0.0.1:4222`). Each test uses a
//! namespace of its own and deletes it at the end. Outside CI a missing
//! server skips the tests with a printed reason; in CI it fails them.

use std::time::Duration;

use futures_util::StreamExt;
use sagamesh_jetstream::JetStream;
use sagamesh_log::Appended;
use sagamesh_log::conformance::event;

async fn bus(test: &str) -> Option<JetStream> {
    let url = std::env::var("SAGAMESH_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let namespace = format!("{test}-{}-{}", std::process::id(), uuid_suffix());
    match JetStream::connect(&url, &namespace).await {
        Ok(bus) => Some(bus),
        Err(e) if std::env::var("CI").is_err() => {
            eprintln!("skipping {test}: {e}");
            None
        }
        Err(e) => panic!("NATS must be running in CI: {e}"),
    }
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos:x}")
}

#[tokio::test]
async fn a_repeated_publish_is_stored_once() {
    let Some(bus) = bus("dedupe").await else { return };
    bus.ensure_consumers(&["g"], Duration::from_secs(5), 100)
        .await
        .unwrap();
    let (a, b) = (event("tx-a"), event("tx-b"));
    let first = bus.publish(&[a.clone(), b.clone()]).await.unwrap();
    assert!(matches!(first[..], [Appended::New(x), Appended::New(y)] if y > x));
    let again = bus.publish(&[b.clone(), event("tx-c")]).await.unwrap();
    assert_eq!(again[0], Appended::Duplicate);
    assert!(matches!(again[1], Appended::New(_)));
    bus.delete().await.unwrap();
}

#[tokio::test]
async fn a_group_gets_every_event_in_order_and_again_what_it_did_not_ack() {
    let Some(bus) = bus("consume").await else { return };
    let ack_wait = Duration::from_secs(1);
    bus.ensure_consumers(&["g", "h"], ack_wait, 100).await.unwrap();
    // One transaction's events share a partition, and come in order.
    let events: Vec<_> = (0..5).map(|_| event("tx-ordered")).collect();
    bus.publish(&events).await.unwrap();
    let partition = sagamesh_jetstream::partition_of("tx-ordered");

    let mut g = Box::pin(bus.consume("g", partition, ack_wait, 100).await.unwrap());
    let mut unacked = None;
    for (i, expected) in events.iter().enumerate() {
        let got = g.next().await.unwrap().unwrap();
        assert_eq!(got.envelope.event_id, expected.event_id, "in publish order");
        assert_eq!(got.delivered, 1);
        if i == 2 {
            unacked = Some(got.sequence);
        } else {
            got.receipt.ack().await;
        }
    }
    // The one not acked comes back after the ack wait, marked as a redelivery.
    let again = tokio::time::timeout(Duration::from_secs(10), g.next())
        .await
        .expect("the unacked event is delivered again")
        .unwrap()
        .unwrap();
    assert_eq!(Some(again.sequence), unacked);
    assert_eq!(again.delivered, 2);
    again.receipt.ack().await;

    // Another group has its own progress: it still sees all five.
    let mut h = Box::pin(bus.consume("h", partition, ack_wait, 100).await.unwrap());
    for expected in &events {
        let got = h.next().await.unwrap().unwrap();
        assert_eq!(got.envelope.event_id, expected.event_id);
        got.receipt.ack().await;
    }
    bus.delete().await.unwrap();
}

#[tokio::test]
async fn dead_letters_pass_the_conformance_suite() {
    let Some(bus) = bus("dead").await else { return };
    sagamesh_log::conformance::dead_letters(&bus).await;
    bus.delete().await.unwrap();
}

#[test]
fn a_transaction_always_maps_to_the_same_partition() {
    let p = sagamesh_jetstream::partition_of("tx-42");
    assert_eq!(p, sagamesh_jetstream::partition_of("tx-42"));
    assert!(p < sagamesh_jetstream::PARTITIONS);
    let spread: std::collections::HashSet<_> = (0..200)
        .map(|i| sagamesh_jetstream::partition_of(&format!("tx-{i}")))
        .collect();
    assert!(spread.len() > 8, "ids spread over the partitions: {spread:?}");
}

#[tokio::test]
async fn a_lease_has_one_holder_until_released_or_expired() {
    let Some(bus) = bus("leases").await else { return };
    let leases = bus.leases(Duration::from_secs(1)).await.unwrap();
    let revision = leases
        .take("lease.g.1", "a")
        .await
        .unwrap()
        .expect("a free lease");
    assert_eq!(leases.take("lease.g.1", "b").await.unwrap(), None, "held by a");
    let renewed = leases
        .renew("lease.g.1", "a", revision)
        .await
        .unwrap()
        .expect("a renews");
    assert_eq!(
        leases.renew("lease.g.1", "b", revision).await.unwrap(),
        None,
        "stale revision"
    );
    leases.release("lease.g.1", renewed).await.unwrap();
    let taken = leases
        .take("lease.g.1", "b")
        .await
        .unwrap()
        .expect("free after release");
    assert!(leases.keys().await.unwrap().contains(&"lease.g.1".to_owned()));
    // Unrenewed, it expires and is free again.
    let started = std::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        poll.tick().await;
        if leases.take("lease.g.1", "c").await.unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the lease never expired"
        );
    }
    let _ = taken;
    bus.delete().await.unwrap();
}
