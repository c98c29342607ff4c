//! The views of sagas in flight, kept in memory, so that applying an event
//! does not first read the stored view back and decode it, and the return
//! of a saga's own first event needs no read at all.
//!
//! Kept only where this coordinator is its store's one writer (the embedded
//! store): replicas sharing PostgreSQL change views this instance never
//! sees. An entry is a copy of a committed row: its `seq`, the view, and
//! the exact bytes stored in `body`. The update that starts from an entry
//! names those bytes (`WHERE seq = .. AND body = ..`), so an entry that
//! fell behind its row (say, a write whose caller went away before it
//! refreshed the entry) changes nothing, and the event is applied to the
//! stored view instead. The only other use of an entry is to tell watchers
//! that a saga's own first event came back: it is in every view of the
//! saga, and watchers skip a view with no more history than they have seen.
//!
//! An entry leaves when its saga ends. At most [`CAPACITY`] sagas are kept;
//! a new one then pushes out an arbitrary other (one left behind, say, by a
//! write whose caller went away), which only sends that saga's next event
//! the stored way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sagamesh_proto::v1::Transaction;

use crate::view;

/// Most views kept; a few KB each (the view and its encoding).
const CAPACITY: usize = 16_384;

/// A saga's row as this coordinator committed it.
pub(crate) struct LiveView {
    pub seq: i64,
    /// Shared with the watchers that were told of it.
    pub view: Arc<Transaction>,
    /// `view` encoded, byte for byte what the row's `body` holds.
    pub body: Vec<u8>,
}

/// The views of sagas in flight, by transaction id.
pub(crate) struct LiveViews {
    /// `None` where other instances write the same store.
    views: Option<Mutex<HashMap<String, Arc<LiveView>>>>,
}

impl LiveViews {
    pub(crate) fn new(enabled: bool) -> LiveViews {
        LiveViews {
            views: enabled.then(|| Mutex::new(HashMap::new())),
        }
    }

    /// Whether views are kept at all.
    pub(crate) fn enabled(&self) -> bool {
        self.views.is_some()
    }

    pub(crate) fn get(&self, transaction_id: &str) -> Option<Arc<LiveView>> {
        self.lock()?.get(transaction_id).cloned()
    }

    /// Keeps the view a write just committed, replacing the saga's entry;
    /// a saga that ended leaves instead.
    pub(crate) fn keep(&self, live: LiveView) {
        self.put(live, true);
    }

    /// Keeps a newly recorded saga's view, unless an event of the saga was
    /// applied (and kept) first.
    pub(crate) fn keep_new(&self, live: LiveView) {
        self.put(live, false);
    }

    fn put(&self, live: LiveView, replace: bool) {
        let Some(mut views) = self.lock() else {
            return;
        };
        let id = &live.view.transaction_id;
        if view::is_terminal(live.view.status()) {
            views.remove(id);
            return;
        }
        if views.contains_key(id) {
            if replace {
                views.insert(id.clone(), Arc::new(live));
            }
            return;
        }
        if views.len() >= CAPACITY
            && let Some(other) = views.keys().next().cloned()
        {
            views.remove(&other);
        }
        views.insert(id.clone(), Arc::new(live));
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, HashMap<String, Arc<LiveView>>>> {
        self.views
            .as_ref()
            .map(|views| views.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use sagamesh_proto::v1::TransactionStatus;

    use super::*;

    fn live(id: &str, status: TransactionStatus, seq: i64) -> LiveView {
        LiveView {
            seq,
            view: Arc::new(Transaction {
                transaction_id: id.to_owned(),
                status: status as i32,
                ..Default::default()
            }),
            body: vec![seq as u8],
        }
    }

    #[test]
    fn a_new_saga_does_not_replace_a_later_view() {
        let views = LiveViews::new(true);
        views.keep(live("t", TransactionStatus::InProgress, 2));
        views.keep_new(live("t", TransactionStatus::Initiated, 1));
        assert_eq!(views.get("t").map(|v| v.seq), Some(2));
        views.keep(live("t", TransactionStatus::InProgress, 3));
        assert_eq!(views.get("t").map(|v| v.seq), Some(3));
    }

    #[test]
    fn an_ended_saga_leaves() {
        let views = LiveViews::new(true);
        views.keep_new(live("t", TransactionStatus::Initiated, 1));
        views.keep(live("t", TransactionStatus::Completed, 1));
        assert!(views.get("t").is_none());
    }

    #[test]
    fn nothing_is_kept_when_disabled_and_a_full_table_makes_room() {
        let off = LiveViews::new(false);
        off.keep_new(live("t", TransactionStatus::Initiated, 1));
        assert!(off.get("t").is_none());

        let views = LiveViews::new(true);
        for n in 0..CAPACITY {
            views.keep_new(live(&n.to_string(), TransactionStatus::Initiated, 1));
        }
        views.keep_new(live("one more", TransactionStatus::Initiated, 1));
        assert!(views.get("one more").is_some());
        let kept = (0..CAPACITY)
            .filter(|n| views.get(&n.to_string()).is_some())
            .count();
        assert_eq!(kept, CAPACITY - 1, "one other saga made room");
    }
}
