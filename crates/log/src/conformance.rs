//! The conformance suite every `EventLog` backend runs in its own tests.

use std::sync::Arc;

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Envelope, PurchaseDetails, PurchaseInitiated};

use crate::{DeadLetterStore, EventLog, Offset, StoredEvent};

/// A saga event of transaction `tx`, with a fresh id, for backends' tests.
pub fn event(tx: &str) -> Arc<Envelope> {
    Arc::new(Envelope::new(
        tx,
        "",
        "conformance",
        Payload::PurchaseInitiated(PurchaseInitiated {
            purchase: Some(PurchaseDetails::default()),
        }),
    ))
}

/// `events` numbered from `first` on, as a router's sequencer numbers them.
pub fn numbered(first: Offset, events: &[Arc<Envelope>]) -> Vec<StoredEvent> {
    events
        .iter()
        .zip(first..)
        .map(|(envelope, offset)| StoredEvent {
            offset,
            envelope: envelope.clone(),
        })
        .collect()
}

/// Appends, reads back in order, and stores an event id only once.
pub async fn append_read_dedupe(log: &dyn EventLog) {
    let start = log.tail(10).await.unwrap().next_offset;
    let (a, b, c) = (event("tx-a"), event("tx-b"), event("tx-c"));
    log.append(numbered(start, &[a.clone(), b.clone()]))
        .await
        .unwrap();
    // A repeat of `b` that the sequencer no longer remembered.
    log.append(numbered(start + 2, &[b.clone(), c.clone()]))
        .await
        .unwrap();
    let read = log.read(start, 10).await.unwrap();
    let stored: Vec<_> = read
        .iter()
        .map(|e| (e.offset, e.envelope.event_id.clone()))
        .collect();
    assert_eq!(
        stored,
        [
            (start, a.event_id.clone()),
            (start + 1, b.event_id.clone()),
            (start + 3, c.event_id.clone())
        ],
        "stored at their offsets, in order, each id once"
    );
    assert_eq!(*read[0].envelope, *a, "events read back unchanged");
    let tail = log.tail(2).await.unwrap();
    assert_eq!(tail.next_offset, start + 4, "above every offset appended");
    assert_eq!(tail.recent_ids, [b.event_id.clone(), c.event_id.clone()]);
}

/// Cursors and truncation; offsets stay above what was truncated and what
/// a cursor passed.
pub async fn cursors_and_truncate(log: &dyn EventLog) {
    let start = log.tail(0).await.unwrap().next_offset;
    log.append(numbered(start, &[event("t1"), event("t2")]))
        .await
        .unwrap();
    let second = start + 1;
    log.save_cursors(vec![("g".into(), second)]).await.unwrap();
    log.save_cursors(vec![("g".into(), second + 1), ("h".into(), second)])
        .await
        .unwrap();
    let mut cursors = log.load_cursors().await.unwrap();
    cursors.sort();
    assert_eq!(cursors, vec![("g".into(), second + 1), ("h".into(), second)]);
    log.truncate(second).await.unwrap();
    let left = log.read(0, 100).await.unwrap();
    assert!(left.iter().all(|e| e.offset >= second));
    assert_eq!(left.first().map(|e| e.offset), Some(second));
    // An event no cursor has passed, then a log truncated empty: offsets go
    // on above it.
    log.append(numbered(second + 1, &[event("t3")])).await.unwrap();
    log.truncate(second + 2).await.unwrap();
    assert!(log.read(0, 100).await.unwrap().is_empty());
    let tail = log.tail(10).await.unwrap();
    assert_eq!((tail.next_offset, tail.recent_ids.len()), (second + 2, 0));
    // A cursor may pass offsets whose append never landed.
    log.save_cursors(vec![("g".into(), second + 7)]).await.unwrap();
    assert_eq!(log.tail(10).await.unwrap().next_offset, second + 7);
}

/// Dead letters are stored, listed newest first, fetched and deleted.
pub async fn dead_letters(log: &dyn DeadLetterStore) {
    let first = log
        .put_dead_letter("g".into(), event("d1"), 5, "boom".into())
        .await
        .unwrap();
    let second = log
        .put_dead_letter("h".into(), event("d2"), 3, "bang".into())
        .await
        .unwrap();
    let all = log.list_dead_letters(None, 0, 10).await.unwrap();
    assert_eq!(all.iter().map(|d| d.id).collect::<Vec<_>>(), vec![second, first]);
    let only_g = log.list_dead_letters(Some("g".into()), 0, 10).await.unwrap();
    assert_eq!(only_g.len(), 1);
    assert_eq!(only_g[0].last_error, "boom");
    assert_eq!(only_g[0].attempts, 5);
    let page = log.list_dead_letters(None, second, 10).await.unwrap();
    assert_eq!(page.iter().map(|d| d.id).collect::<Vec<_>>(), vec![first]);
    assert_eq!(
        log.get_dead_letter(first)
            .await
            .unwrap()
            .unwrap()
            .envelope
            .transaction_id,
        "d1"
    );
    assert!(log.delete_dead_letter(first).await.unwrap());
    assert!(!log.delete_dead_letter(first).await.unwrap());
    assert!(log.get_dead_letter(first).await.unwrap().is_none());
}
