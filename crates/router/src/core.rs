//! The router's state, owned by one task and changed only by [`Command`]s, so
//! no lock is ever held and every decision sees a consistent picture.
//!
//! For each group the core keeps a queue per transaction. The head of a
//! transaction's queue (its first event not yet processed) is either waiting
//! in `ready`, in flight to one instance, waiting out a retry delay or being
//! dead-lettered; the rest wait behind it. That is what keeps a
//! transaction's events in order within a group while different
//! transactions proceed in parallel.
//!
//! An instance may say an event is processed before it acks it: its effects
//! are committed, not yet durable. The event then stays at the front of its
//! queue, still unacked for the cursor, and the next one becomes the head.
//! If the ack never comes (the stream breaks, the deadline passes, or the
//! instance nacks), the event is retried like any failed delivery, as the
//! head again, and every later event of the transaction that went out
//! since is taken back, so the transaction's events are delivered again in
//! order. For the same reason a later event's ack that comes first is
//! settled only after the earlier one's.
//!
//! Durability of progress, on the embedded log: for each group the core
//! saves a cursor, the lowest offset it has not seen acked. After a restart
//! everything from the cursor on is delivered again (at least once; handlers
//! are idempotent), and the log is truncated below the lowest cursor of all
//! groups. On JetStream each event is acked to the group's durable consumer
//! once the group is done with it, and JetStream redelivers the rest.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use sagamesh_jetstream::{Consumed, Receipt};
use sagamesh_log::{DeadLetter, DeadLetterStore, EventLog, LogError, Offset, StoredEvent};
use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{
    AttachResponse, DeadLettered, Deliveries, Delivery, Envelope, EventType, Hello, SagaMode, Welcome,
    attach_response,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::appender::Append;
use crate::{Backend, RouterConfig};

/// Commands waiting for the core. When full, streams wait before reading on.
pub(crate) const COMMAND_QUEUE: usize = 8192;
/// How often deadlines, delayed retries and cursors are looked at.
const TICK: Duration = Duration::from_millis(20);
/// How often the log is truncated below every group's cursor.
const TRUNCATE_EVERY: Duration = Duration::from_secs(5);
/// Events read per page while recovering.
const RECOVERY_PAGE: usize = 10_000;
/// How long to wait before trying again to store a dead letter.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// The most bytes of deliveries in one message to an instance: what gRPC
/// carries, less room for the message's own framing.
const MAX_DELIVERY_BYTES: usize = sagamesh_proto::MAX_MESSAGE_SIZE - 1024;
/// The largest event the router takes, so that a delivery of it always
/// fits one message.
pub(crate) const MAX_EVENT_BYTES: usize = MAX_DELIVERY_BYTES - 64;

/// What a stream sends to its instance.
pub(crate) type Outbound = mpsc::Sender<Result<AttachResponse, Status>>;

pub(crate) enum Command {
    Attach {
        instance: u64,
        hello: Hello,
        outbound: Outbound,
        reply: oneshot::Sender<Result<(), Status>>,
    },
    Detach {
        instance: u64,
    },
    Ack {
        instance: u64,
        delivery_ids: Vec<u64>,
    },
    /// Deliveries whose effects are committed, not yet durable.
    Processed {
        instance: u64,
        delivery_ids: Vec<u64>,
    },
    Nack {
        instance: u64,
        delivery_id: u64,
        reason: String,
    },
    /// Events numbered for the embedded log, in offset order (their append
    /// may still be on its way; see the appender).
    Appended(Vec<StoredEvent>),
    /// An event from a group's JetStream consumer.
    Consumed {
        group: usize,
        event: Consumed,
    },
    /// This router no longer pulls the group's partition: its events held
    /// here go back to JetStream (nak), so the next router gets them first;
    /// `done` is answered once they were handed back.
    Forget {
        group: usize,
        partition: u32,
        done: oneshot::Sender<()>,
    },
    /// Sends a dead letter to its group again.
    Replay {
        dead_letter: DeadLetter,
        reply: oneshot::Sender<Result<(), Status>>,
    },
    /// A dead letter was stored; the transaction's queue may move on.
    DeadLettered {
        group: usize,
        transaction: Arc<str>,
        serial: u64,
    },
    /// A cursor save finished.
    CursorsSaved,
    /// A replayed dead letter was deleted (or stored again as a new one).
    ReplayEnded {
        id: u64,
    },
}

/// How the core records that a group is done with an event.
enum Settle {
    /// Its offset leaves the group's unacked set (the cursor moves past it).
    Offset(Offset),
    /// It is acked to the group's JetStream consumer.
    Receipt { sequence: u64, receipt: Receipt },
    /// A replayed dead letter, which is in no log any more.
    Replay,
}

/// Where an event is on its way through one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Queued; sent once it is its transaction's head.
    Waiting,
    /// Sent to an instance, which has not answered yet.
    Sent { delivery_id: u64 },
    /// Its instance committed it and will ack it once it is durable.
    Processed { delivery_id: u64 },
    /// Acked while an earlier event of its transaction is still processed
    /// and unacked: it is settled after that one, in order.
    Acked,
    /// Taken back (an earlier event failed) while its instance may still
    /// be handling it: it goes out again once that delivery is answered
    /// or its deadline passes, so no instance runs it twice at once and
    /// the instance's room stays counted.
    Recalled { delivery_id: u64 },
    /// Waiting out a retry delay.
    Delayed,
    /// Being stored as a dead letter.
    DeadLettering,
}

/// One event waiting for (or in) delivery to one group.
struct Pending {
    /// Names it within the core, so that an answer finds it wherever it
    /// stands in its queue.
    serial: u64,
    stage: Stage,
    settle: Settle,
    envelope: Arc<Envelope>,
    attempts: u32,
    last_error: String,
    /// Set when this is a replay of that dead letter.
    replay_of: Option<u64>,
}

/// Stream sequences of JetStream events a group settled lately. An ack
/// races JetStream's redelivery of the same event (sent when it stayed
/// unacked past the ack wait): a copy that arrives after the ack is not a
/// new event.
#[derive(Default)]
struct Settled {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

/// Settled events remembered per group. Stale copies arrive within an ack
/// wait of the ack; at thousands of events a second this covers a second
/// or more, and JetStream redelivers only what stayed unacked that long.
const SETTLED_REMEMBERED: usize = 8_192;

impl Settled {
    fn insert(&mut self, sequence: u64) {
        if self.set.insert(sequence) {
            self.order.push_back(sequence);
            if self.order.len() > SETTLED_REMEMBERED
                && let Some(oldest) = self.order.pop_front()
            {
                self.set.remove(&oldest);
            }
        }
    }

    fn contains(&self, sequence: u64) -> bool {
        self.set.contains(&sequence)
    }
}

/// A transaction's head: its first event not yet processed (or acked).
fn head(queue: &mut VecDeque<Pending>) -> Option<&mut Pending> {
    queue
        .iter_mut()
        .find(|pending| !matches!(pending.stage, Stage::Processed { .. } | Stage::Acked))
}

/// A queued event of a group, found by its serial.
fn pending_mut<'q>(
    queues: &'q mut HashMap<Arc<str>, VecDeque<Pending>>,
    transaction: &str,
    serial: u64,
) -> Option<&'q mut Pending> {
    queues
        .get_mut(transaction)?
        .iter_mut()
        .find(|pending| pending.serial == serial)
}

struct Group {
    name: String,
    event_types: Vec<EventType>,
    queues: HashMap<Arc<str>, VecDeque<Pending>>,
    /// Transactions whose head event may be deliverable now. A transaction
    /// can be here twice, or with its head busy: `dispatch` sends a head
    /// only while it is `Waiting`.
    ready: VecDeque<Arc<str>>,
    /// Offsets of events not yet acked, for the cursor (embedded log).
    unacked: BTreeSet<Offset>,
    /// Stream sequences of the JetStream events held, so that JetStream's
    /// redelivery of one still held is not queued twice.
    held: HashSet<u64>,
    /// And of those settled lately, for the same reason.
    settled: Settled,
    /// Attached instances, taken in turn.
    instances: Vec<u64>,
    next_instance: usize,
    saved_cursor: Offset,
}

struct Instance {
    group: Option<usize>,
    outbound: Outbound,
    max_in_flight: usize,
    in_flight: HashSet<u64>,
}

struct InFlight {
    group: usize,
    transaction: Arc<str>,
    /// The [`Pending`] delivered.
    serial: u64,
    /// Taken back: its answer only frees the instance's room.
    recalled: bool,
    instance: u64,
    deadline: Instant,
}

pub(crate) struct Core {
    /// The embedded log, for cursors and truncation; `None` on JetStream.
    log: Option<Arc<dyn EventLog>>,
    dead_letters: Arc<dyn DeadLetterStore>,
    /// Instances attached per group, for the JetStream lease manager.
    members: watch::Sender<Vec<usize>>,
    config: Arc<RouterConfig>,
    commands: mpsc::Sender<Command>,
    /// For the router's own `DeadLettered` events.
    appender: mpsc::Sender<Append>,
    groups: Vec<Group>,
    groups_by_type: HashMap<EventType, Vec<usize>>,
    instances: HashMap<u64, Instance>,
    in_flight: HashMap<u64, InFlight>,
    /// Events waiting out a retry delay: (due, group, transaction, serial).
    delayed: Vec<(Instant, usize, Arc<str>, u64)>,
    /// Dead letters being replayed, so one is not replayed twice at once.
    replaying: HashSet<u64>,
    next_delivery_id: u64,
    next_serial: u64,
    /// Every offset at or below this one has reached the core.
    appended_through: Offset,
    saving_cursors: bool,
    last_truncate: Instant,
    truncated_below: Offset,
}

/// Deliveries for one instance that go out as one message.
struct DeliveryMessage {
    deliveries: Vec<Delivery>,
    /// Their encoded size within the message.
    bytes: usize,
}

/// Adds a delivery to an instance's messages, starting a new message where
/// the last one would pass [`MAX_DELIVERY_BYTES`].
fn pack(messages: &mut Vec<DeliveryMessage>, delivery: Delivery) {
    let len = prost::Message::encoded_len(&delivery);
    // Its field tag and length prefix within `Deliveries`.
    let bytes = 1 + prost::length_delimiter_len(len) + len;
    match messages.last_mut() {
        Some(open) if open.bytes + bytes <= MAX_DELIVERY_BYTES => {
            open.deliveries.push(delivery);
            open.bytes += bytes;
        }
        _ => messages.push(DeliveryMessage {
            deliveries: vec![delivery],
            bytes,
        }),
    }
}

/// Appends the router's own `DeadLettered` notice and waits until it is
/// durable, trying again while the append fails: the dead-lettered event
/// leaves its queue (and the cursor may pass it) only after that, so a
/// saga waiting on the notice never misses it. The notice keeps its id
/// across tries, so the log stores it once. False once the router stops.
async fn publish_notice(appender: &mpsc::Sender<Append>, notice: Arc<Envelope>) -> bool {
    loop {
        let (reply, answer) = oneshot::channel();
        let append = Append {
            events: vec![notice.clone()],
            reply,
        };
        if appender.send(append).await.is_err() {
            return false;
        }
        match answer.await {
            Ok(Ok(_)) => return true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, tx_id = %notice.transaction_id, "could not append a dead-letter notice; retrying");
                tokio::time::sleep(DEAD_LETTER_RETRY).await;
            }
            Err(_) => return false,
        }
    }
}

impl Core {
    /// Builds the state from the log: every event at or after a group's
    /// cursor is queued for that group again.
    pub(crate) async fn recover(
        backend: &Backend,
        config: Arc<RouterConfig>,
        commands: mpsc::Sender<Command>,
        appender: mpsc::Sender<Append>,
        members: watch::Sender<Vec<usize>>,
    ) -> Result<Core, LogError> {
        let log = match backend {
            Backend::Embedded(log) => Some(log.clone()),
            Backend::JetStream(_) => None,
        };
        let cursors: HashMap<String, Offset> = match &log {
            Some(log) => log.load_cursors().await?.into_iter().collect(),
            None => HashMap::new(),
        };
        // A group with nothing left to ack has its cursor here, not back at
        // the start, even when the log holds no events.
        let appended_through = match &log {
            Some(log) => log.tail(0).await?.next_offset.saturating_sub(1),
            None => 0,
        };
        let mut groups_by_type: HashMap<EventType, Vec<usize>> = HashMap::new();
        let groups: Vec<Group> = config
            .subscriptions
            .iter()
            .enumerate()
            .map(|(index, sub)| {
                for event_type in &sub.event_types {
                    groups_by_type.entry(*event_type).or_default().push(index);
                }
                Group {
                    name: sub.group.to_owned(),
                    event_types: sub.event_types.clone(),
                    queues: HashMap::new(),
                    ready: VecDeque::new(),
                    unacked: BTreeSet::new(),
                    held: HashSet::new(),
                    settled: Settled::default(),
                    instances: Vec::new(),
                    next_instance: 0,
                    saved_cursor: cursors.get(sub.group).copied().unwrap_or(0),
                }
            })
            .collect();
        let mut core = Core {
            log: log.clone(),
            dead_letters: backend.dead_letters(),
            members,
            config,
            commands,
            appender,
            groups,
            groups_by_type,
            instances: HashMap::new(),
            in_flight: HashMap::new(),
            delayed: Vec::new(),
            replaying: HashSet::new(),
            next_delivery_id: 1,
            next_serial: 1,
            appended_through,
            saving_cursors: false,
            last_truncate: Instant::now(),
            truncated_below: 0,
        };
        let Some(log) = log else {
            // JetStream's consumers redeliver what was not acked.
            return Ok(core);
        };
        let mut from = core.groups.iter().map(|g| g.saved_cursor).min().unwrap_or(0);
        let mut recovered = 0usize;
        loop {
            let page = log.read(from, RECOVERY_PAGE).await?;
            let Some(last) = page.last() else { break };
            from = last.offset + 1;
            recovered += page.len();
            core.enqueue(page, true);
        }
        if recovered > 0 {
            tracing::info!(events = recovered, "router recovered unacked events from its log");
        }
        Ok(core)
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        // A final cursor save, so a clean restart redelivers little.
        if let Some(log) = &self.log
            && let Err(e) = log.save_cursors(self.cursors()).await
        {
            tracing::warn!(error = %e, "could not save cursors at shutdown");
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Attach {
                instance,
                hello,
                outbound,
                reply,
            } => {
                let answer = self.attach(instance, hello, outbound);
                let _ = reply.send(answer);
            }
            Command::Detach { instance } => self.detach(instance),
            Command::Ack {
                instance,
                delivery_ids,
            } => self.answer_each(instance, delivery_ids, Core::ack),
            Command::Processed {
                instance,
                delivery_ids,
            } => self.answer_each(instance, delivery_ids, Core::processed),
            Command::Nack {
                instance,
                delivery_id,
                reason,
            } => {
                if let Some(flight) = self.take_in_flight(instance, delivery_id) {
                    self.retry(flight, reason, true);
                }
            }
            Command::Appended(events) => self.enqueue(events, false),
            Command::Consumed { group, event } => self.enqueue_consumed(group, event),
            Command::Forget {
                group,
                partition,
                done,
            } => self.forget(group, partition, done),
            Command::Replay { dead_letter, reply } => {
                let answer = self.replay(dead_letter);
                let _ = reply.send(answer);
            }
            Command::DeadLettered {
                group,
                transaction,
                serial,
            } => {
                self.finish(group, &transaction, serial);
                self.dispatch(group);
            }
            Command::CursorsSaved => self.saving_cursors = false,
            Command::ReplayEnded { id } => {
                self.replaying.remove(&id);
            }
        }
    }

    /// Handles an instance's answer for each delivery, then dispatches
    /// once each group that `answer` says may send again.
    fn answer_each(
        &mut self,
        instance: u64,
        delivery_ids: Vec<u64>,
        answer: fn(&mut Core, u64, u64) -> Option<usize>,
    ) {
        let mut touched = Vec::new();
        for id in delivery_ids {
            if let Some(group) = answer(self, instance, id) {
                touched.push(group);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for group in touched {
            self.dispatch(group);
        }
    }

    fn attach(&mut self, instance: u64, hello: Hello, outbound: Outbound) -> Result<(), Status> {
        let mode = SagaMode::try_from(hello.mode).unwrap_or(SagaMode::Unspecified);
        if mode != self.config.mode {
            return Err(Status::failed_precondition(format!(
                "this mesh runs in {} mode, but service '{}' runs in {} mode; start it with the mesh's mode",
                self.config.mode.name(),
                hello.service,
                mode.name()
            )));
        }
        let max_in_flight = hello.max_in_flight;
        if !(1..=4096).contains(&max_in_flight) {
            return Err(Status::invalid_argument(format!(
                "max_in_flight must be between 1 and 4096, not {max_in_flight}"
            )));
        }
        let group = if hello.group.is_empty() {
            if !hello.event_types.is_empty() {
                return Err(Status::invalid_argument(
                    "a hello that names event types must name its group",
                ));
            }
            None
        } else {
            let Some(index) = self.groups.iter().position(|g| g.name == hello.group) else {
                let known: Vec<_> = self.groups.iter().map(|g| g.name.as_str()).collect();
                return Err(Status::failed_precondition(format!(
                    "group '{}' is not a subscription of this {} mesh (its groups: {})",
                    hello.group,
                    self.config.mode.name(),
                    known.join(", ")
                )));
            };
            let group = &self.groups[index];
            let mut wanted: Vec<EventType> = hello
                .event_types
                .iter()
                .map(|t| EventType::try_from(*t).unwrap_or(EventType::Unspecified))
                .collect();
            wanted.sort_unstable();
            let mut expected = group.event_types.clone();
            expected.sort_unstable();
            if wanted != expected {
                return Err(Status::failed_precondition(format!(
                    "group '{}' subscribes to {:?} in this mesh, but the hello asked for {:?}",
                    group.name,
                    expected.iter().map(|t| t.as_str_name()).collect::<Vec<_>>(),
                    wanted.iter().map(|t| t.as_str_name()).collect::<Vec<_>>()
                )));
            }
            Some(index)
        };
        self.instances.insert(
            instance,
            Instance {
                group,
                outbound,
                max_in_flight: max_in_flight as usize,
                in_flight: HashSet::new(),
            },
        );
        tracing::info!(
            instance,
            service = %hello.service,
            group = %hello.group,
            instance_id = %hello.instance_id,
            max_in_flight,
            "handler attached"
        );
        // The welcome goes out before any delivery can.
        let welcome = AttachResponse {
            kind: Some(attach_response::Kind::Welcome(Welcome {
                ack_deadline_ms: self.config.ack_deadline.as_millis() as u64,
                max_attempts: self.config.max_attempts,
                accepts_processed: true,
            })),
        };
        if let Some(attached) = self.instances.get(&instance)
            && attached.outbound.try_send(Ok(welcome)).is_err()
        {
            self.detach(instance);
            return Err(Status::cancelled("the stream closed while attaching"));
        }
        if let Some(index) = group {
            self.groups[index].instances.push(instance);
            self.publish_members();
            self.dispatch(index);
        }
        Ok(())
    }

    fn detach(&mut self, instance: u64) {
        let Some(gone) = self.instances.remove(&instance) else {
            return;
        };
        if gone.in_flight.is_empty() {
            tracing::info!(instance, "handler detached");
        } else {
            tracing::info!(
                instance,
                in_flight = gone.in_flight.len(),
                "handler detached; delivering again its unacked events"
            );
        }
        let Some(group) = gone.group else { return };
        self.groups[group].instances.retain(|i| *i != instance);
        self.publish_members();
        // Oldest first: a transaction's processed events go back ahead of
        // the later ones.
        let mut in_flight: Vec<u64> = gone.in_flight.into_iter().collect();
        in_flight.sort_unstable();
        for delivery_id in in_flight {
            match self.in_flight.remove(&delivery_id) {
                Some(flight) if flight.recalled => self.release_recalled(flight, delivery_id),
                Some(flight) => self.retry(flight, "the stream broke before the ack".into(), false),
                None => {}
            }
        }
    }

    /// Takes a delivery out of flight if this instance holds it. A
    /// recalled delivery is released instead, and its answer ignored.
    fn take_in_flight(&mut self, instance: u64, delivery_id: u64) -> Option<InFlight> {
        match self.in_flight.get(&delivery_id) {
            Some(flight) if flight.instance == instance => {}
            // Unknown or stale (redelivered after its deadline): ignore.
            _ => return None,
        }
        let flight = self.in_flight.remove(&delivery_id)?;
        if let Some(holder) = self.instances.get_mut(&instance) {
            holder.in_flight.remove(&delivery_id);
        }
        if flight.recalled {
            self.release_recalled(flight, delivery_id);
            return None;
        }
        Some(flight)
    }

    /// A recalled delivery was answered, or its deadline passed: its
    /// event may go out again when its turn comes.
    fn release_recalled(&mut self, flight: InFlight, delivery_id: u64) {
        let group = &mut self.groups[flight.group];
        let recalled = pending_mut(&mut group.queues, &flight.transaction, flight.serial)
            .filter(|p| p.stage == Stage::Recalled { delivery_id });
        if let Some(pending) = recalled {
            pending.stage = Stage::Waiting;
            group.ready.push_front(flight.transaction);
            self.dispatch(flight.group);
        }
    }

    /// Handles one ack; returns the group to dispatch again.
    fn ack(&mut self, instance: u64, delivery_id: u64) -> Option<usize> {
        let flight = self.take_in_flight(instance, delivery_id)?;
        let acked = pending_mut(
            &mut self.groups[flight.group].queues,
            &flight.transaction,
            flight.serial,
        )?;
        acked.stage = Stage::Acked;
        self.settle_acked(flight.group, &flight.transaction);
        Some(flight.group)
    }

    /// Handles one "processed": the event stays in its queue until its
    /// ack, and the transaction's next event may go out. Returns the group
    /// to dispatch again when there is one waiting.
    fn processed(&mut self, instance: u64, delivery_id: u64) -> Option<usize> {
        let flight = self
            .in_flight
            .get(&delivery_id)
            .filter(|f| f.instance == instance && !f.recalled)?;
        let group = &mut self.groups[flight.group];
        let queue = group.queues.get_mut(&flight.transaction)?;
        let pending = queue.iter_mut().find(|p| p.serial == flight.serial)?;
        if pending.stage != (Stage::Sent { delivery_id }) {
            return None;
        }
        pending.stage = Stage::Processed { delivery_id };
        if head(queue).is_some_and(|next| next.stage == Stage::Waiting) {
            group.ready.push_back(flight.transaction.clone());
            return Some(flight.group);
        }
        None
    }

    /// A dead-lettered event leaves its queue and the group's unacked
    /// events.
    fn finish(&mut self, group_index: usize, transaction: &Arc<str>, serial: u64) {
        let group = &mut self.groups[group_index];
        let Some(queue) = group.queues.get_mut(transaction) else {
            return;
        };
        let position = queue.iter().position(|p| p.serial == serial);
        if let Some(done) = position.and_then(|at| queue.remove(at)) {
            self.settle(group_index, done);
        }
        self.settle_acked(group_index, transaction);
    }

    /// Settles the acked events at the front of a transaction's queue, in
    /// order; an acked event behind a processed one waits for it.
    fn settle_acked(&mut self, group_index: usize, transaction: &Arc<str>) {
        let group = &mut self.groups[group_index];
        let Some(queue) = group.queues.get_mut(transaction) else {
            return;
        };
        let mut settled = Vec::new();
        while queue.front().is_some_and(|p| p.stage == Stage::Acked) {
            settled.extend(queue.pop_front());
        }
        if queue.is_empty() {
            group.queues.remove(transaction);
        } else if head(queue).is_some_and(|next| next.stage == Stage::Waiting) {
            group.ready.push_back(transaction.clone());
        }
        for done in settled {
            self.settle(group_index, done);
        }
    }

    /// The group is done with an event: the cursor may pass it, or
    /// JetStream is told.
    fn settle(&mut self, group_index: usize, done: Pending) {
        let group = &mut self.groups[group_index];
        match done.settle {
            Settle::Offset(offset) => {
                group.unacked.remove(&offset);
            }
            Settle::Receipt { sequence, receipt } => {
                group.held.remove(&sequence);
                group.settled.insert(sequence);
                tokio::spawn(receipt.ack());
            }
            Settle::Replay => {}
        }
        if let Some(id) = done.replay_of {
            // It stays marked as replaying until it is deleted, so a
            // second replay request meanwhile is refused.
            let (log, commands) = (self.dead_letters.clone(), self.commands.clone());
            tokio::spawn(async move {
                if let Err(e) = log.delete_dead_letter(id).await {
                    tracing::warn!(error = %e, dead_letter = id, "could not delete a replayed dead letter");
                }
                let _ = commands.send(Command::ReplayEnded { id }).await;
            });
        }
    }

    /// A delivery failed (nack, deadline or broken stream): deliver again,
    /// later for a nack, or dead-letter it after the maximum attempts.
    fn retry(&mut self, flight: InFlight, reason: String, delay: bool) {
        let max_attempts = self.config.max_attempts;
        let Some(stage) = pending_mut(
            &mut self.groups[flight.group].queues,
            &flight.transaction,
            flight.serial,
        )
        .map(|p| p.stage) else {
            return;
        };
        if matches!(stage, Stage::Processed { .. }) {
            self.take_back_after(&flight);
        }
        let group = &mut self.groups[flight.group];
        let Some(head) = pending_mut(&mut group.queues, &flight.transaction, flight.serial) else {
            return;
        };
        head.last_error = reason;
        if head.attempts >= max_attempts {
            let (group_name, envelope, attempts, error) = (
                group.name.clone(),
                head.envelope.clone(),
                head.attempts,
                head.last_error.clone(),
            );
            tracing::error!(
                group = %group_name,
                tx_id = %envelope.transaction_id,
                event = envelope.event_type().as_str_name(),
                attempts,
                error = %error,
                "event moved to the dead-letter store"
            );
            let replay_of = head.replay_of;
            head.stage = Stage::DeadLettering;
            let serial = head.serial;
            let (log, commands, appender) = (
                self.dead_letters.clone(),
                self.commands.clone(),
                self.appender.clone(),
            );
            let (group_index, transaction) = (flight.group, flight.transaction);
            tokio::spawn(async move {
                // Until the dead letter is stored, the transaction waits:
                // nothing behind it may overtake it.
                loop {
                    match log
                        .put_dead_letter(group_name.clone(), envelope.clone(), attempts, error.clone())
                        .await
                    {
                        Ok(id) => {
                            // Tell the saga's watchers why it stopped.
                            let notice = envelope.caused(
                                "router",
                                Payload::DeadLettered(DeadLettered {
                                    dead_letter_id: id,
                                    group: group_name.clone(),
                                    event_id: envelope.event_id.clone(),
                                    event: envelope.event_type() as i32,
                                    attempts,
                                    last_error: error.clone(),
                                }),
                            );
                            if !publish_notice(&appender, Arc::new(notice)).await {
                                // The router is stopping: the event stays
                                // unacked and comes back after a restart.
                                return;
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "could not store a dead letter; retrying");
                            tokio::time::sleep(DEAD_LETTER_RETRY).await;
                        }
                    }
                }
                if let Some(old) = replay_of {
                    let _ = log.delete_dead_letter(old).await;
                    let _ = commands.send(Command::ReplayEnded { id: old }).await;
                }
                let _ = commands
                    .send(Command::DeadLettered {
                        group: group_index,
                        transaction,
                        serial,
                    })
                    .await;
            });
            return;
        }
        if delay {
            let exponential = self
                .config
                .retry_base
                .saturating_mul(1 << head.attempts.saturating_sub(1).min(16))
                .min(self.config.retry_max);
            let backoff = exponential.mul_f64(0.5 + rand::random::<f64>());
            head.stage = Stage::Delayed;
            self.delayed.push((
                Instant::now() + backoff,
                flight.group,
                flight.transaction,
                flight.serial,
            ));
        } else {
            head.stage = Stage::Waiting;
            group.ready.push_front(flight.transaction);
            self.dispatch(flight.group);
        }
    }

    /// A processed event was not acked (its stream broke, its deadline
    /// passed, or making it durable failed), so it will be the
    /// transaction's head again: every later event of the transaction that
    /// went out since is taken back (an acked one included), to be
    /// delivered again after it, in order; one still in flight is recalled
    /// until its instance answers. An instance that kept the effects finds
    /// them already applied.
    fn take_back_after(&mut self, flight: &InFlight) {
        let group = &mut self.groups[flight.group];
        let Some(queue) = group.queues.get_mut(&flight.transaction) else {
            return;
        };
        let Some(at) = queue.iter().position(|p| p.serial == flight.serial) else {
            return;
        };
        for pending in queue.iter_mut().skip(at + 1) {
            pending.stage = match pending.stage {
                Stage::Sent { delivery_id } | Stage::Processed { delivery_id } => {
                    match self.in_flight.get_mut(&delivery_id) {
                        Some(taken) => {
                            taken.recalled = true;
                            Stage::Recalled { delivery_id }
                        }
                        None => Stage::Waiting,
                    }
                }
                Stage::Acked => Stage::Waiting,
                Stage::Waiting | Stage::Delayed | Stage::DeadLettering | Stage::Recalled { .. } => continue,
            };
        }
    }

    /// Queues events of the log for every group subscribed to their type.
    fn enqueue(&mut self, events: Vec<StoredEvent>, recovering: bool) {
        let mut touched = HashSet::new();
        for event in events {
            self.appended_through = self.appended_through.max(event.offset);
            let Some(groups) = self.groups_by_type.get(&event.envelope.event_type()) else {
                continue;
            };
            for &index in groups {
                let serial = self.next_serial;
                let group = &mut self.groups[index];
                if recovering && event.offset < group.saved_cursor {
                    continue;
                }
                self.next_serial += 1;
                let transaction: Arc<str> = Arc::from(event.envelope.transaction_id.as_str());
                let queue = group.queues.entry(transaction.clone()).or_default();
                if head(queue).is_none() {
                    // It is the transaction's head.
                    group.ready.push_back(transaction);
                }
                queue.push_back(Pending {
                    serial,
                    stage: Stage::Waiting,
                    settle: Settle::Offset(event.offset),
                    envelope: event.envelope.clone(),
                    attempts: 0,
                    last_error: String::new(),
                    replay_of: None,
                });
                group.unacked.insert(event.offset);
                touched.insert(index);
            }
        }
        if !recovering {
            for index in touched {
                self.dispatch(index);
            }
        }
    }

    /// Queues an event from a group's JetStream consumer, unless the group
    /// holds it already (JetStream redelivers what stays unacked past the
    /// ack deadline, even while it waits behind its transaction's head).
    fn enqueue_consumed(&mut self, group_index: usize, event: Consumed) {
        let group = &mut self.groups[group_index];
        if group.settled.contains(event.sequence) {
            // A redelivery sent before the ack reached JetStream.
            tokio::spawn(event.receipt.ack());
            return;
        }
        if !group.held.insert(event.sequence) {
            return;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let transaction: Arc<str> = Arc::from(event.envelope.transaction_id.as_str());
        let queue = group.queues.entry(transaction.clone()).or_default();
        if head(queue).is_none() {
            // It is the transaction's head.
            group.ready.push_back(transaction);
        }
        queue.push_back(Pending {
            serial,
            stage: Stage::Waiting,
            settle: Settle::Receipt {
                sequence: event.sequence,
                receipt: event.receipt,
            },
            envelope: event.envelope,
            attempts: 0,
            last_error: String::new(),
            replay_of: None,
        });
        self.dispatch(group_index);
    }

    fn publish_members(&self) {
        let counts = self.groups.iter().map(|g| g.instances.len()).collect();
        self.members.send_replace(counts);
    }

    /// Drops the group's events of one JetStream partition, in flight or
    /// queued, and hands them back to JetStream in order.
    fn forget(&mut self, group_index: usize, partition: u32, done: oneshot::Sender<()>) {
        let group = &mut self.groups[group_index];
        let gone: Vec<Arc<str>> = group
            .queues
            .keys()
            .filter(|tx| sagamesh_jetstream::partition_of(tx) == partition)
            .cloned()
            .collect();
        let mut receipts = Vec::new();
        for transaction in &gone {
            for pending in group.queues.remove(transaction).into_iter().flatten() {
                if let Settle::Receipt { sequence, receipt } = pending.settle {
                    group.held.remove(&sequence);
                    receipts.push((sequence, receipt));
                }
            }
        }
        let gone: HashSet<Arc<str>> = gone.into_iter().collect();
        group.ready.retain(|tx| !gone.contains(tx));
        self.delayed
            .retain(|(_, g, tx, _)| !(*g == group_index && gone.contains(tx)));
        let flights: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.group == group_index && gone.contains(&f.transaction))
            .map(|(id, _)| *id)
            .collect();
        for id in flights {
            if let Some(flight) = self.in_flight.remove(&id)
                && let Some(instance) = self.instances.get_mut(&flight.instance)
            {
                instance.in_flight.remove(&id);
            }
        }
        receipts.sort_unstable_by_key(|(sequence, _)| *sequence);
        tokio::spawn(async move {
            for (_, receipt) in receipts {
                receipt.nak().await;
            }
            let _ = done.send(());
        });
        // Their instances may have room again for the group's other events.
        self.dispatch(group_index);
    }

    fn replay(&mut self, dead_letter: DeadLetter) -> Result<(), Status> {
        let Some(index) = self.groups.iter().position(|g| g.name == dead_letter.group) else {
            return Err(Status::failed_precondition(format!(
                "dead letter {} belongs to group '{}', which this mesh does not have",
                dead_letter.id, dead_letter.group
            )));
        };
        if !self.replaying.insert(dead_letter.id) {
            return Err(Status::failed_precondition(format!(
                "dead letter {} is already being replayed",
                dead_letter.id
            )));
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let group = &mut self.groups[index];
        let transaction: Arc<str> = Arc::from(dead_letter.envelope.transaction_id.as_str());
        let queue = group.queues.entry(transaction.clone()).or_default();
        if head(queue).is_none() {
            // It is the transaction's head.
            group.ready.push_back(transaction);
        }
        queue.push_back(Pending {
            serial,
            stage: Stage::Waiting,
            settle: Settle::Replay,
            envelope: dead_letter.envelope,
            attempts: 0,
            last_error: String::new(),
            replay_of: Some(dead_letter.id),
        });
        self.dispatch(index);
        Ok(())
    }

    /// Sends ready events to the group's instances that have room.
    fn dispatch(&mut self, group_index: usize) {
        let group = &mut self.groups[group_index];
        if group.instances.is_empty() || group.ready.is_empty() {
            return;
        }
        let mut batches: HashMap<u64, Vec<DeliveryMessage>> = HashMap::new();
        let deadline = Instant::now() + self.config.ack_deadline;
        'events: while let Some(transaction) = group.ready.pop_front() {
            let sendable = group
                .queues
                .get_mut(&transaction)
                .and_then(head)
                .is_some_and(|head| head.stage == Stage::Waiting);
            if !sendable {
                continue;
            }
            // Find the next instance in turn with room.
            let count = group.instances.len();
            let mut chosen = None;
            for step in 0..count {
                let position = (group.next_instance + step) % count;
                let id = group.instances[position];
                let instance = &self.instances[&id];
                if instance.in_flight.len() < instance.max_in_flight {
                    chosen = Some(id);
                    group.next_instance = position + 1;
                    break;
                }
            }
            let Some(instance_id) = chosen else {
                group.ready.push_front(transaction);
                break 'events;
            };
            let Some(head) = group.queues.get_mut(&transaction).and_then(head) else {
                continue;
            };
            head.attempts += 1;
            let delivery_id = self.next_delivery_id;
            self.next_delivery_id += 1;
            head.stage = Stage::Sent { delivery_id };
            let serial = head.serial;
            pack(
                batches.entry(instance_id).or_default(),
                Delivery {
                    delivery_id,
                    attempt: head.attempts,
                    envelope: Some((*head.envelope).clone()),
                },
            );
            if let Some(instance) = self.instances.get_mut(&instance_id) {
                instance.in_flight.insert(delivery_id);
            }
            self.in_flight.insert(
                delivery_id,
                InFlight {
                    group: group_index,
                    transaction,
                    serial,
                    recalled: false,
                    instance: instance_id,
                    deadline,
                },
            );
        }
        for (instance_id, messages) in batches {
            if self.config.drop_stream_probability > 0.0
                && rand::random::<f64>() < self.config.drop_stream_probability
            {
                tracing::warn!(
                    instance = instance_id,
                    "fault injection: dropping a handler's stream"
                );
                if let Some(instance) = self.instances.get(&instance_id) {
                    let _ = instance.outbound.try_send(Err(Status::unavailable(
                        "the router dropped this stream (fault injection)",
                    )));
                }
                self.detach(instance_id);
                continue;
            }
            for DeliveryMessage { deliveries, .. } in messages {
                let message = AttachResponse {
                    kind: Some(attach_response::Kind::Deliveries(Deliveries { deliveries })),
                };
                let sent = self
                    .instances
                    .get(&instance_id)
                    .map(|i| i.outbound.try_send(Ok(message)).is_ok())
                    .unwrap_or(false);
                if !sent {
                    // The stream is gone or hopelessly behind: take its work back.
                    self.detach(instance_id);
                    break;
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let mut expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, flight)| flight.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        // Oldest first, as on a detach.
        expired.sort_unstable();
        for id in expired {
            // Retrying one may detach an instance whose stream is full or
            // gone, and that retries its other deliveries itself.
            let Some(instance) = self.in_flight.get(&id).map(|flight| flight.instance) else {
                continue;
            };
            if let Some(flight) = self.take_in_flight(instance, id) {
                tracing::warn!(
                    tx_id = %flight.transaction,
                    group = %self.groups[flight.group].name,
                    "ack deadline passed; delivering again"
                );
                self.retry(flight, "the ack deadline passed".into(), false);
            }
        }
        if !self.delayed.is_empty() {
            let mut due = Vec::new();
            self.delayed.retain(|(at, group, tx, serial)| {
                if *at <= now {
                    due.push((*group, tx.clone(), *serial));
                    false
                } else {
                    true
                }
            });
            for (group, tx, serial) in due {
                let waited = pending_mut(&mut self.groups[group].queues, &tx, serial)
                    .filter(|p| p.stage == Stage::Delayed);
                if let Some(pending) = waited {
                    pending.stage = Stage::Waiting;
                    self.groups[group].ready.push_front(tx);
                    self.dispatch(group);
                }
            }
        }
        self.save_cursors_if_moved();
    }

    /// For each group, the lowest offset it has not acked.
    fn cursors(&self) -> Vec<(String, Offset)> {
        let next = self.appended_through + 1;
        self.groups
            .iter()
            .map(|g| (g.name.clone(), g.unacked.first().copied().unwrap_or(next)))
            .collect()
    }

    fn save_cursors_if_moved(&mut self) {
        let Some(log) = self.log.clone() else { return };
        if self.saving_cursors {
            return;
        }
        let cursors = self.cursors();
        let moved = cursors
            .iter()
            .zip(&self.groups)
            .any(|((_, cursor), g)| *cursor != g.saved_cursor);
        if !moved {
            return;
        }
        for ((_, cursor), group) in cursors.iter().zip(self.groups.iter_mut()) {
            group.saved_cursor = *cursor;
        }
        let lowest = cursors.iter().map(|(_, c)| *c).min().unwrap_or(0);
        let truncate = lowest > self.truncated_below && self.last_truncate.elapsed() >= TRUNCATE_EVERY;
        if truncate {
            self.truncated_below = lowest;
            self.last_truncate = Instant::now();
        }
        self.saving_cursors = true;
        let commands = self.commands.clone();
        tokio::spawn(async move {
            if let Err(e) = log.save_cursors(cursors).await {
                tracing::warn!(error = %e, "could not save the router's cursors");
            } else if truncate && let Err(e) = log.truncate(lowest).await {
                tracing::warn!(error = %e, "could not truncate the router's log");
            }
            let _ = commands.send(Command::CursorsSaved).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use sagamesh_log_sqlite::SqliteLog;
    use sagamesh_proto::v1::{PurchaseDetails, PurchaseInitiated};
    use sagamesh_saga::Subscription;
    use sagamesh_store::Durability;

    use super::*;

    /// A core on a fresh log, with what it sends to itself and to the
    /// appender (nothing runs them here: the test plays their part).
    struct Harness {
        core: Core,
        commands: mpsc::Receiver<Command>,
        appends: mpsc::Receiver<Append>,
    }

    async fn harness(dir: &tempfile::TempDir, configure: impl FnOnce(&mut RouterConfig)) -> Harness {
        let log = SqliteLog::open(&dir.path().join("router.db"), Durability::Process).unwrap();
        let mut config = RouterConfig::new(
            SagaMode::Choreography,
            vec![Subscription {
                group: "wallets",
                handler: "WalletHandler",
                event_types: vec![EventType::PurchaseInitiated],
            }],
        );
        configure(&mut config);
        let (commands, commands_rx) = mpsc::channel(16);
        let (appender, appends) = mpsc::channel(16);
        let (members, _) = watch::channel(Vec::new());
        let core = Core::recover(
            &Backend::Embedded(Arc::new(log)),
            Arc::new(config),
            commands,
            appender,
            members,
        )
        .await
        .unwrap();
        Harness {
            core,
            commands: commands_rx,
            appends,
        }
    }

    fn hello(max_in_flight: u32) -> Hello {
        Hello {
            service: "wallets".into(),
            group: "wallets".into(),
            event_types: vec![EventType::PurchaseInitiated as i32],
            max_in_flight,
            instance_id: "test".into(),
            mode: SagaMode::Choreography as i32,
            credentials: vec![],
            takes_publish_failed: true,
        }
    }

    fn initiated(offset: Offset, transaction_id: &str) -> StoredEvent {
        let payload = Payload::PurchaseInitiated(PurchaseInitiated {
            purchase: Some(PurchaseDetails::default()),
        });
        StoredEvent {
            offset,
            envelope: Arc::new(Envelope::new(transaction_id, "", "test", payload)),
        }
    }

    /// Every delivery in the messages received so far, by transaction.
    fn delivered(inbound: &mut mpsc::Receiver<Result<AttachResponse, Status>>) -> Vec<String> {
        let mut transactions = Vec::new();
        while let Ok(Ok(message)) = inbound.try_recv() {
            if let Some(attach_response::Kind::Deliveries(batch)) = message.kind {
                transactions.extend(
                    batch
                        .deliveries
                        .into_iter()
                        .filter_map(|d| d.envelope.map(|e| e.transaction_id)),
                );
            }
        }
        transactions.sort();
        transactions
    }

    #[tokio::test]
    async fn a_restart_with_nothing_to_redeliver_keeps_the_cursors_where_they_were() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = SqliteLog::open(&dir.path().join("router.db"), Durability::Process).unwrap();
            log.append(vec![initiated(41, "tx-acked")]).await.unwrap();
            log.save_cursors(vec![("wallets".into(), 42)]).await.unwrap();
            log.truncate(42).await.unwrap();
        }
        let harness = harness(&dir, |_| {}).await;
        assert_eq!(harness.core.cursors(), vec![("wallets".to_owned(), 42)]);
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_expiring_together_on_a_stream_that_is_full_go_to_the_next_instance() {
        let dir = tempfile::tempdir().unwrap();
        let mut harness = harness(&dir, |config| config.ack_deadline = Duration::from_secs(1)).await;
        let core = &mut harness.core;
        // Room for the welcome and one batch: the stream is full once both
        // events went out in one message and nobody reads it.
        let (stalled, _stalled_inbound) = mpsc::channel(2);
        core.attach(1, hello(2), stalled).unwrap();
        core.enqueue(vec![initiated(1, "tx-a"), initiated(2, "tx-b")], false);
        assert_eq!(core.in_flight.len(), 2, "both went out in one batch");

        // Both pass their deadline in the same tick. Sending the first again
        // finds the stream full and detaches it, which takes the second out
        // of flight as well.
        tokio::time::advance(Duration::from_secs(2)).await;
        core.on_tick();
        assert!(core.in_flight.is_empty());
        assert!(!core.instances.contains_key(&1), "the full stream was let go");

        let (healthy, mut inbound) = mpsc::channel(16);
        core.attach(2, hello(2), healthy).unwrap();
        assert_eq!(delivered(&mut inbound), vec!["tx-a", "tx-b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_lettered_event_leaves_its_queue_only_once_its_notice_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut harness = harness(&dir, |config| config.max_attempts = 1).await;
        let (outbound, mut inbound) = mpsc::channel(16);
        harness.core.attach(1, hello(1), outbound).unwrap();
        harness.core.enqueue(vec![initiated(1, "tx-a")], false);
        let delivery_id = *harness.core.in_flight.keys().next().expect("delivered");
        let _ = delivered(&mut inbound);

        // Its one attempt fails: the event becomes a dead letter.
        harness.core.handle(Command::Nack {
            instance: 1,
            delivery_id,
            reason: "the wallet is on fire".into(),
        });
        let first = harness.appends.recv().await.expect("the notice is appended");
        let notice = first.events[0].clone();
        assert_eq!(notice.event_type(), EventType::DeadLettered);
        first.reply.send(Err("disk full".into())).unwrap();

        // The append failed: the notice is tried again, with the same id,
        // and the event has not left its queue meanwhile.
        let second = harness.appends.recv().await.expect("the notice is tried again");
        assert_eq!(second.events[0].event_id, notice.event_id);
        assert!(
            harness.commands.try_recv().is_err(),
            "nothing settled before the notice is durable"
        );
        second.reply.send(Ok((1, 0))).unwrap();

        match harness.commands.recv().await {
            Some(Command::DeadLettered { transaction, .. }) => assert_eq!(&*transaction, "tx-a"),
            _ => panic!("expected the event to be settled as dead-lettered"),
        }
    }

    /// The deliveries received so far, as (delivery id, transaction, attempt).
    fn deliveries(inbound: &mut mpsc::Receiver<Result<AttachResponse, Status>>) -> Vec<(u64, String, u32)> {
        let mut received = Vec::new();
        while let Ok(Ok(message)) = inbound.try_recv() {
            if let Some(attach_response::Kind::Deliveries(batch)) = message.kind {
                received.extend(
                    batch
                        .deliveries
                        .into_iter()
                        .filter_map(|d| d.envelope.map(|e| (d.delivery_id, e.transaction_id, d.attempt))),
                );
            }
        }
        received
    }

    /// The one delivery received so far, failing the test (saying `why`
    /// one was expected) on none or several.
    fn only_delivery(
        inbound: &mut mpsc::Receiver<Result<AttachResponse, Status>>,
        why: &str,
    ) -> (u64, String, u32) {
        let mut received = deliveries(inbound);
        assert_eq!(received.len(), 1, "{why}: {received:?}");
        received.remove(0)
    }

    fn processed(core: &mut Core, instance: u64, delivery_id: u64) {
        core.handle(Command::Processed {
            instance,
            delivery_ids: vec![delivery_id],
        });
    }

    fn ack(core: &mut Core, instance: u64, delivery_id: u64) {
        core.handle(Command::Ack {
            instance,
            delivery_ids: vec![delivery_id],
        });
    }

    #[tokio::test]
    async fn a_processed_event_lets_the_next_go_out_but_holds_the_cursor_until_its_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut harness = harness(&dir, |_| {}).await;
        let core = &mut harness.core;
        let (outbound, mut inbound) = mpsc::channel(16);
        core.attach(1, hello(8), outbound).unwrap();
        core.enqueue(vec![initiated(1, "tx-a"), initiated(2, "tx-a")], false);
        let first = only_delivery(&mut inbound, "one event of a transaction at a time");

        processed(core, 1, first.0);
        let second = only_delivery(
            &mut inbound,
            "the next event went out once the first was processed",
        );
        assert_eq!(
            core.cursors()[0].1,
            1,
            "the processed event still holds the cursor"
        );

        // An event that arrives behind processed ones only goes out at once.
        processed(core, 1, second.0);
        core.enqueue(vec![initiated(3, "tx-a")], false);
        let third = only_delivery(&mut inbound, "nothing but processed events ahead of it");

        // Acks may come in any order; the cursor passes each acked event.
        ack(core, 1, second.0);
        ack(core, 1, third.0);
        assert_eq!(core.cursors()[0].1, 1);
        ack(core, 1, first.0);
        assert_eq!(core.cursors()[0].1, 4);
        assert!(core.groups[0].queues.is_empty());
        assert!(core.in_flight.is_empty());
    }

    #[tokio::test]
    async fn processed_events_that_were_never_acked_go_out_again_ahead_of_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut harness = harness(&dir, |_| {}).await;
        let core = &mut harness.core;
        let (first_stream, mut first_inbound) = mpsc::channel(16);
        core.attach(1, hello(8), first_stream).unwrap();
        core.enqueue(
            vec![initiated(1, "tx-a"), initiated(2, "tx-a"), initiated(3, "tx-a")],
            false,
        );
        let one = deliveries(&mut first_inbound);
        processed(core, 1, one[0].0);
        let two = deliveries(&mut first_inbound);
        processed(core, 1, two[0].0);
        only_delivery(
            &mut first_inbound,
            "the third event is out, the first two unacked",
        );

        // A second instance attaches; the first one's stream breaks before
        // it acked anything. The first event goes out again (to the second
        // instance), and nothing behind it until it is answered.
        let (second_stream, mut second_inbound) = mpsc::channel(16);
        core.attach(2, hello(8), second_stream).unwrap();
        core.detach(1);
        let again = only_delivery(&mut second_inbound, "one delivery");
        assert_eq!(again.2, 2, "its second attempt");
        assert_eq!(core.in_flight.len(), 1);

        // The rest follow in order, each after the one before is processed.
        processed(core, 2, again.0);
        let then = only_delivery(&mut second_inbound, "one delivery");
        assert_eq!(then.2, 2, "the second event went out again as well");
        ack(core, 2, again.0);
        ack(core, 2, then.0);
        let last = only_delivery(&mut second_inbound, "one delivery");
        assert_eq!(last.2, 2, "the third, taken back from the broken stream");
        ack(core, 2, last.0);
        assert_eq!(core.cursors()[0].1, 4);
    }

    #[tokio::test]
    async fn an_event_processed_by_one_instance_takes_back_a_later_one_sent_to_another() {
        let dir = tempfile::tempdir().unwrap();
        let mut harness = harness(&dir, |_| {}).await;
        let core = &mut harness.core;
        let (first_stream, mut first_inbound) = mpsc::channel(16);
        let (second_stream, mut second_inbound) = mpsc::channel(16);
        core.attach(1, hello(8), first_stream).unwrap();
        core.attach(2, hello(8), second_stream).unwrap();
        core.enqueue(vec![initiated(1, "tx-a"), initiated(2, "tx-a")], false);
        // Instances are taken in turn: the first event goes to the first.
        let first = only_delivery(&mut first_inbound, "one delivery");
        processed(core, 1, first.0);
        let later = only_delivery(&mut second_inbound, "the next event went to the second instance");

        // The first instance goes away without its ack: the first event
        // comes back, and the later one is recalled from the second
        // instance, which may still be handling it.
        core.detach(1);
        let again = only_delivery(&mut second_inbound, "only the first event is out again");
        assert_eq!(again.2, 2);
        assert_eq!(
            core.instances[&2].in_flight.len(),
            2,
            "the recalled one still takes room"
        );
        ack(core, 2, again.0);
        assert!(
            deliveries(&mut second_inbound).is_empty(),
            "the later event waits until its first delivery is answered"
        );

        // The old delivery's answer only releases it.
        ack(core, 2, later.0);
        assert_eq!(core.cursors()[0].1, 2, "the stale ack settled nothing");
        let then = only_delivery(&mut second_inbound, "then the later event, once more");
        assert_eq!(then.2, 2);
        ack(core, 2, then.0);
        assert_eq!(core.cursors()[0].1, 3);
    }

    #[tokio::test]
    async fn a_later_event_acked_first_is_delivered_again_when_an_earlier_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut harness = harness(&dir, |_| {}).await;
        let core = &mut harness.core;
        let (outbound, mut inbound) = mpsc::channel(16);
        core.attach(1, hello(8), outbound).unwrap();
        core.enqueue(vec![initiated(1, "tx-a"), initiated(2, "tx-a")], false);
        let first = only_delivery(&mut inbound, "the first event");
        processed(core, 1, first.0);
        let second = only_delivery(&mut inbound, "the second event, once the first is processed");
        processed(core, 1, second.0);
        ack(core, 1, second.0);
        assert_eq!(core.cursors()[0].1, 1, "the later ack waits for the earlier one");

        // Making the first durable failed: it comes back after a delay, as
        // a second attempt, and the second event follows it again.
        core.handle(Command::Nack {
            instance: 1,
            delivery_id: first.0,
            reason: "fsync failed".into(),
        });
        assert!(deliveries(&mut inbound).is_empty(), "a nack waits out a delay");
        assert_eq!(core.delayed.len(), 1);
        core.delayed[0].0 = Instant::now();
        core.on_tick();
        let again = only_delivery(&mut inbound, "one delivery");
        assert_eq!(again.2, 2, "the first event's second attempt");
        ack(core, 1, again.0);
        let then = only_delivery(&mut inbound, "one delivery");
        assert_eq!(then.2, 2, "the second event, delivered again after it");
        ack(core, 1, then.0);
        assert_eq!(core.cursors()[0].1, 3);
    }

    #[tokio::test]
    async fn a_processed_event_that_never_becomes_durable_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let mut harness = harness(&dir, |config| config.max_attempts = 2).await;
        let (outbound, mut inbound) = mpsc::channel(16);
        harness.core.attach(1, hello(8), outbound).unwrap();
        harness.core.enqueue(vec![initiated(1, "tx-a")], false);
        for attempt in 1..=2 {
            let delivered = only_delivery(&mut inbound, "one delivery");
            assert_eq!(delivered.2, attempt);
            processed(&mut harness.core, 1, delivered.0);
            harness.core.handle(Command::Nack {
                instance: 1,
                delivery_id: delivered.0,
                reason: "fsync failed".into(),
            });
            for delayed in &mut harness.core.delayed {
                delayed.0 = Instant::now();
            }
            harness.core.on_tick();
        }
        let append = harness.appends.recv().await.expect("its dead-letter notice");
        assert_eq!(append.events[0].event_type(), EventType::DeadLettered);
    }

    fn delivery_of(bytes: usize) -> Delivery {
        let mut envelope = initiated(1, "tx-a").envelope.as_ref().clone();
        envelope.producer = "x".repeat(bytes);
        Delivery {
            delivery_id: 1,
            attempt: 1,
            envelope: Some(envelope),
        }
    }

    /// The encoded size of the message that carries these deliveries.
    fn message_len(deliveries: Vec<Delivery>) -> usize {
        let message = AttachResponse {
            kind: Some(attach_response::Kind::Deliveries(Deliveries { deliveries })),
        };
        prost::Message::encoded_len(&message)
    }

    #[test]
    fn deliveries_are_packed_into_messages_that_grpc_carries() {
        let mut messages = Vec::new();
        for _ in 0..3 {
            pack(&mut messages, delivery_of(7 * 1024 * 1024));
        }
        for _ in 0..100 {
            pack(&mut messages, delivery_of(100));
        }
        let sizes: Vec<usize> = messages
            .iter()
            .map(|m| message_len(m.deliveries.clone()))
            .collect();
        assert_eq!(sizes.len(), 2, "two large deliveries fill a message: {sizes:?}");
        assert!(sizes.iter().all(|size| *size <= sagamesh_proto::MAX_MESSAGE_SIZE));
        assert_eq!(messages.iter().map(|m| m.deliveries.len()).sum::<usize>(), 103);

        // An event near the largest the router takes fits a message alone.
        let largest = delivery_of(MAX_EVENT_BYTES - 200);
        let event_len = prost::Message::encoded_len(largest.envelope.as_ref().unwrap());
        assert!((MAX_EVENT_BYTES - 400..=MAX_EVENT_BYTES).contains(&event_len));
        assert!(message_len(vec![largest]) <= sagamesh_proto::MAX_MESSAGE_SIZE);
    }
}
