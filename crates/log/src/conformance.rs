//! The conformance suite every `EventLog` backend runs in its own tests.

use std::sync::Arc;

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{Envelope, PurchaseDetails, PurchaseInitiated};

use crate::{Appended, DeadLetterStore, EventLog};

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

/// Appends, reads back in order, and dedupes by event id.
pub async fn append_read_dedupe(log: &dyn EventLog) {
    let a = event("tx-a");
    let b = event("tx-b");
    let first = log.append(vec![a.clone(), b.clone()]).await.unwrap();
    let (Appended::New(oa), Appended::New(ob)) = (first[0], first[1]) else {
        panic!("fresh events must be new: {first:?}");
    };
    assert!(ob > oa, "offsets grow in append order");
    let again = log.append(vec![b.clone(), event("tx-c")]).await.unwrap();
    assert_eq!(again[0], Appended::Duplicate, "same event id is a duplicate");
    assert!(matches!(again[1], Appended::New(o) if o > ob));
    let read = log.read(oa, 10).await.unwrap();
    let ids: Vec<_> = read.iter().map(|e| e.envelope.event_id.clone()).collect();
    assert_eq!(ids[..2], [a.event_id.clone(), b.event_id.clone()]);
    assert_eq!(read.len(), 3);
    assert_eq!(*read[0].envelope, *a, "events read back unchanged");
}

/// Cursors and truncation.
pub async fn cursors_and_truncate(log: &dyn EventLog) {
    let appended = log.append(vec![event("t1"), event("t2")]).await.unwrap();
    let Appended::New(second) = appended[1] else {
        panic!("expected a new event")
    };
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
