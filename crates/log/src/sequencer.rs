//! Numbers published events and spots repeats, in memory, so that a router
//! can deliver an event before its log has committed it.
//!
//! A publisher repeats an event when it did not hear that the router has it
//! (a stream that broke, a router that restarted). The sequencer remembers
//! the ids of the latest events it numbered (and, after a restart, those the
//! log holds last), and calls a repeat of one of them a duplicate. A repeat
//! older than that window is numbered again: the router then delivers it
//! once more, which every consumer absorbs, since delivery is at least once
//! and consumers dedupe by id; the log does not store it twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use sagamesh_proto::v1::Envelope;

use crate::{Appended, Offset, StoredEvent, Tail};

pub struct Sequencer {
    next_offset: Offset,
    window: usize,
    /// Each remembered id, with the offset it was given.
    offsets: HashMap<Arc<str>, Offset>,
    /// The same ids, oldest first, to forget them in turn.
    order: VecDeque<(Arc<str>, Offset)>,
}

impl Sequencer {
    /// Starts where the log left off, remembering up to `window` ids.
    pub fn new(tail: Tail, window: usize) -> Sequencer {
        let mut sequencer = Sequencer {
            next_offset: tail.next_offset.max(1),
            window: window.max(1),
            offsets: HashMap::with_capacity(window.min(tail.recent_ids.len() * 2)),
            order: VecDeque::new(),
        };
        // The offset a stored id had matters to no one, only that it is
        // remembered; 0 is never one a new event gets.
        for id in tail.recent_ids {
            sequencer.remember(Arc::from(id), 0);
        }
        sequencer
    }

    /// Numbers the events not seen lately, in order; returns what happened
    /// to each event and the new events with their offsets.
    pub fn assign(&mut self, events: &[Arc<Envelope>]) -> (Vec<Appended>, Vec<StoredEvent>) {
        let mut outcomes = Vec::with_capacity(events.len());
        let mut new = Vec::with_capacity(events.len());
        for event in events {
            if self.offsets.contains_key(event.event_id.as_str()) {
                outcomes.push(Appended::Duplicate);
                continue;
            }
            let offset = self.next_offset;
            self.next_offset += 1;
            self.remember(Arc::from(event.event_id.as_str()), offset);
            outcomes.push(Appended::New(offset));
            new.push(StoredEvent {
                offset,
                envelope: event.clone(),
            });
        }
        (outcomes, new)
    }

    /// Forgets events whose append failed, so that their publishers'
    /// retries count as new. Their offsets stay used.
    pub fn forget(&mut self, events: &[StoredEvent]) {
        for event in events {
            let id = event.envelope.event_id.as_str();
            if self.offsets.get(id) == Some(&event.offset) {
                self.offsets.remove(id);
            }
        }
    }

    /// The offset the next new event gets.
    pub fn next_offset(&self) -> Offset {
        self.next_offset
    }

    fn remember(&mut self, id: Arc<str>, offset: Offset) {
        if self.order.len() == self.window
            && let Some((oldest, at)) = self.order.pop_front()
            && self.offsets.get(&oldest) == Some(&at)
        {
            self.offsets.remove(&oldest);
        }
        self.offsets.insert(id.clone(), offset);
        self.order.push_back((id, offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::event;

    fn offsets(outcomes: &[Appended]) -> Vec<Option<Offset>> {
        outcomes
            .iter()
            .map(|outcome| match outcome {
                Appended::New(offset) => Some(*offset),
                Appended::Duplicate => None,
            })
            .collect()
    }

    #[test]
    fn numbers_new_events_in_order_from_the_tail_and_spots_repeats() {
        let stored = event("stored");
        let tail = Tail {
            next_offset: 10,
            recent_ids: vec![stored.event_id.clone()],
        };
        let mut sequencer = Sequencer::new(tail, 100);
        let (a, b) = (event("a"), event("b"));
        let (outcomes, new) = sequencer.assign(&[a.clone(), stored, b.clone(), a.clone()]);
        assert_eq!(offsets(&outcomes), [Some(10), None, Some(11), None]);
        assert_eq!(
            new.iter()
                .map(|e| (e.offset, e.envelope.event_id.clone()))
                .collect::<Vec<_>>(),
            [(10, a.event_id.clone()), (11, b.event_id.clone())]
        );
        let (again, _) = sequencer.assign(&[b, event("c")]);
        assert_eq!(offsets(&again), [None, Some(12)]);
        assert_eq!(sequencer.next_offset(), 13);
    }

    #[test]
    fn remembers_only_the_window_and_forgets_failed_appends() {
        let mut sequencer = Sequencer::new(Tail::default(), 2);
        let events: Vec<_> = (0..3).map(|i| event(&format!("t{i}"))).collect();
        let (_, first) = sequencer.assign(&events);
        assert_eq!(first.iter().map(|e| e.offset).collect::<Vec<_>>(), [1, 2, 3]);
        // The first fell out of a window of two: a repeat is numbered anew.
        let (outcomes, _) = sequencer.assign(&[events[2].clone(), events[1].clone(), events[0].clone()]);
        assert_eq!(offsets(&outcomes), [None, None, Some(4)]);
        // An append that failed leaves no trace but its offset.
        sequencer.forget(&first[2..]);
        let (outcomes, _) = sequencer.assign(&[events[2].clone()]);
        assert_eq!(offsets(&outcomes), [Some(5)]);
    }

    #[test]
    fn forgetting_a_stale_entry_keeps_the_newer_one() {
        let mut sequencer = Sequencer::new(Tail::default(), 10);
        let e = event("t");
        let (_, first) = sequencer.assign(std::slice::from_ref(&e));
        sequencer.forget(&first);
        let (_, second) = sequencer.assign(std::slice::from_ref(&e));
        // Forgetting the first append again must not drop the second.
        sequencer.forget(&first);
        assert_eq!(offsets(&sequencer.assign(&[e]).0), [None]);
        assert_eq!((first[0].offset, second[0].offset), (1, 2));
    }
}
