//! On JetStream, which router pulls which partition of which group, and the
//! tasks that pull them into the core.
//!
//! Several routers may serve one mesh, and a handler instance attaches to
//! any of them. A transaction's events must still reach a group in order,
//! so each (group, partition) is pulled by one router at a time: the one
//! holding its lease in the namespace's lease bucket. A router takes leases
//! only for groups with instances attached to it, and about its share of
//! them: the partitions divided by the routers that have instances of the
//! group (each announces that with a membership entry). Leases and
//! memberships expire unless renewed, so the partitions of a router that
//! died are taken over within seconds; what it held unacked JetStream hands
//! to the new owner once the ack wait has passed.
//!
//! A router that gives a partition up (its share shrank, or its last
//! instance of the group left) stops pulling it, hands the events it holds
//! back to JetStream and keeps the lease for one ack wait more, until the
//! events still in its consumer's buffer are back too. So the next owner
//! gets them before the ones behind them.
//!
//! Events of types the group does not subscribe to are acked at once: the
//! consumers read a whole partition (the server this targets filters on one
//! subject per consumer), and Interest retention removes an event only once
//! every group acked it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::{join_all, try_join_all};
use sagamesh_jetstream::{JetStream, Leases, PARTITIONS};
use sagamesh_log::LogError;
use sagamesh_proto::v1::EventType;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::RouterConfig;
use crate::core::Command;

/// Events one partition of a group may hold unacked (queued behind their
/// transaction's head or in flight). When reached, JetStream stops handing
/// out more, which bounds the router's memory.
const MAX_PENDING_PER_PARTITION: usize = 1_000;
/// How long to wait before pulling again after the consumer failed.
const RETRY: Duration = Duration::from_secs(1);
/// JetStream's ack wait is the ack deadline, capped at this: it is how long
/// an event held by a router that died waits before JetStream offers it to
/// the next one. Events a live router holds longer come back early and are
/// dropped as already held.
const MAX_ACK_WAIT: Duration = Duration::from_secs(5);
/// How long a lease or membership lives without renewal.
const LEASE_TTL: Duration = Duration::from_secs(6);
/// How often leases are renewed and the shares looked at again.
const BALANCE_EVERY: Duration = Duration::from_millis(500);
/// How long a release waits for the held events to be handed back.
const HAND_BACK_WAIT: Duration = Duration::from_secs(2);

/// Makes every consumer exist and starts balancing the partitions.
pub(crate) async fn start(
    bus: &JetStream,
    config: Arc<RouterConfig>,
    core: mpsc::Sender<Command>,
    attached: watch::Receiver<Vec<usize>>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), LogError> {
    let groups: Vec<&str> = config.subscriptions.iter().map(|s| s.group).collect();
    let ack_wait = config.ack_deadline.min(MAX_ACK_WAIT);
    bus.ensure_consumers(&groups, ack_wait, MAX_PENDING_PER_PARTITION)
        .await?;
    let leases = bus.leases(LEASE_TTL).await?;
    let balancer = Balancer {
        bus: bus.clone(),
        leases,
        me: uuid::Uuid::now_v7().simple().to_string(),
        config,
        ack_wait,
        core,
        attached,
        held: HashMap::new(),
        tasks: tasks.clone(),
    };
    tasks.spawn(balancer.run(shutdown));
    Ok(())
}

/// Whether a partition given up frees its lease for the next router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// After its events are back in JetStream.
    WhenHandedBack,
    /// Never: it is another router's already, or it expires (this router
    /// is stopping).
    Never,
}

/// A partition this router pulls.
struct Held {
    revision: u64,
    stop: CancellationToken,
    /// The task pulling the partition into the core.
    feed: JoinHandle<()>,
}

struct Balancer {
    bus: JetStream,
    leases: Leases,
    /// This router, in the lease bucket.
    me: String,
    config: Arc<RouterConfig>,
    ack_wait: Duration,
    core: mpsc::Sender<Command>,
    /// Instances attached per group (by subscription index).
    attached: watch::Receiver<Vec<usize>>,
    held: HashMap<(usize, u32), Held>,
    tasks: TaskTracker,
}

fn lease_key(group: &str, partition: u32) -> String {
    format!("lease.{group}.{partition}")
}

impl Balancer {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(BALANCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.balance().await {
                tracing::warn!(error = %e, "could not balance JetStream partitions");
            }
        }
        let all: Vec<(usize, u32)> = self.held.keys().copied().collect();
        for (group, partition) in all {
            self.give_up(group, partition, Release::Never);
        }
    }

    /// One look at the bucket: renews what this router holds, gives up
    /// what is beyond its share and takes free partitions up to it. The
    /// bucket calls of a step go out together, and hand-backs run on their
    /// own tasks, so a slow answer or a busy core cannot hold the renewals
    /// up until the leases expire.
    async fn balance(&mut self) -> Result<(), LogError> {
        let attached = self.attached.borrow().clone();
        let (leases, me) = (&self.leases, self.me.as_str());
        let memberships = self
            .config
            .subscriptions
            .iter()
            .zip(&attached)
            .filter(|(_, instances)| **instances > 0)
            .map(|(subscription, _)| {
                let key = format!("member.{}.{}", subscription.group, me);
                async move { leases.announce(&key, me).await }
            });
        try_join_all(memberships).await?;
        self.renew_all().await;

        let keys: HashSet<String> = self.leases.keys().await?.into_iter().collect();
        let config = self.config.clone();
        for (index, subscription) in config.subscriptions.iter().enumerate() {
            let mine: Vec<u32> = self
                .held
                .keys()
                .filter(|(g, _)| *g == index)
                .map(|(_, p)| *p)
                .collect();
            if attached[index] == 0 {
                for partition in mine {
                    self.give_up(index, partition, Release::WhenHandedBack);
                }
                continue;
            }
            let prefix = format!("member.{}.", subscription.group);
            let routers = keys.iter().filter(|k| k.starts_with(&prefix)).count().max(1) as u32;
            let share = PARTITIONS.div_ceil(routers) as usize;
            for &partition in mine.iter().skip(share) {
                self.give_up(index, partition, Release::WhenHandedBack);
            }
            let free = (0..PARTITIONS)
                .filter(|p| {
                    !self.held.contains_key(&(index, *p))
                        && !keys.contains(&lease_key(subscription.group, *p))
                })
                .take(share.saturating_sub(mine.len()))
                .collect::<Vec<u32>>();
            let (leases, me) = (&self.leases, self.me.as_str());
            let takes = free.into_iter().map(|partition| {
                let key = lease_key(subscription.group, partition);
                async move { (partition, leases.take(&key, me).await) }
            });
            for (partition, taken) in join_all(takes).await {
                match taken {
                    Ok(Some(revision)) => self.pull(index, partition, revision),
                    // Another router was quicker.
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(lease = %lease_key(subscription.group, partition), error = %e, "could not take a partition lease")
                    }
                }
            }
        }
        Ok(())
    }

    /// Renews every held lease; a lease lost meanwhile stops its pulling.
    async fn renew_all(&mut self) {
        let (leases, me) = (&self.leases, self.me.as_str());
        let renewals = self.held.iter().map(|(&(group, partition), held)| {
            let key = lease_key(self.config.subscriptions[group].group, partition);
            let revision = held.revision;
            async move {
                let renewed = leases.renew(&key, me, revision).await;
                (group, partition, key, renewed)
            }
        });
        for (group, partition, key, renewed) in join_all(renewals).await {
            match renewed {
                Ok(Some(revision)) => {
                    if let Some(held) = self.held.get_mut(&(group, partition)) {
                        held.revision = revision;
                    }
                }
                Ok(None) => {
                    tracing::warn!(lease = %key, "lost a partition lease; another router pulls it now");
                    self.give_up(group, partition, Release::Never);
                }
                // Tried again on the next tick, well before the lease expires.
                Err(e) => tracing::warn!(lease = %key, error = %e, "could not renew a partition lease"),
            }
        }
    }

    /// Starts pulling a partition whose lease this router just took.
    fn pull(&mut self, group: usize, partition: u32, revision: u64) {
        let stop = CancellationToken::new();
        let feed = self.tasks.spawn(feed(
            self.bus.clone(),
            group,
            partition,
            self.config.clone(),
            self.ack_wait,
            self.core.clone(),
            stop.clone(),
        ));
        self.held
            .insert((group, partition), Held { revision, stop, feed });
    }

    /// Stops pulling a partition and, on a task of its own, hands its
    /// events back. The lease is freed only once every event JetStream
    /// handed this router is back: the held ones at once (nak), the ones
    /// still in the consumer's buffer after the ack wait. Until then no
    /// other router pulls the partition, so its next owner gets a
    /// transaction's events in order. On `Release::Never` (the router is
    /// stopping) or if the hand-back fails, the lease is left to expire,
    /// which takes longer than the ack wait.
    fn give_up(&mut self, group: usize, partition: u32, release: Release) {
        let Some(held) = self.held.remove(&(group, partition)) else {
            return;
        };
        let key = lease_key(self.config.subscriptions[group].group, partition);
        let (core, leases, revision) = (self.core.clone(), self.leases.clone(), held.revision);
        let ack_wait = self.ack_wait;
        self.tasks.spawn(async move {
            let handed_back = stop_and_hand_back(core, group, partition, held).await;
            if release == Release::Never {
                return;
            }
            if !handed_back {
                tracing::warn!(lease = %key, "could not hand a partition's events back; its lease will expire");
                return;
            }
            tokio::time::sleep(ack_wait).await;
            if let Err(e) = leases.release(&key, revision).await {
                tracing::warn!(lease = %key, error = %e, "could not release a partition lease; it will expire");
            }
        });
    }
}

/// Stops pulling a partition and, once none of its events can reach the
/// core any more, has the core hand the ones it holds back to JetStream;
/// returns whether they were handed back within [`HAND_BACK_WAIT`].
async fn stop_and_hand_back(core: mpsc::Sender<Command>, group: usize, partition: u32, held: Held) -> bool {
    held.stop.cancel();
    // It ends at once: it looks at `stop` before each step.
    let _ = held.feed.await;
    let (done, handed_back) = oneshot::channel();
    let forget = Command::Forget {
        group,
        partition,
        done,
    };
    if core.send(forget).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(HAND_BACK_WAIT, handed_back).await,
        Ok(Ok(()))
    )
}

/// Pulls one partition of a group into the core until stopped.
async fn feed(
    bus: JetStream,
    group: usize,
    partition: u32,
    config: Arc<RouterConfig>,
    ack_wait: Duration,
    core: mpsc::Sender<Command>,
    stop: CancellationToken,
) {
    let subscription = &config.subscriptions[group];
    let wanted: HashSet<EventType> = subscription.event_types.iter().copied().collect();
    // Every wait looks at `stop` first: once stopped, nothing more of the
    // partition may reach the core, or it would arrive after the hand-back.
    loop {
        let consumer = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            consumer = bus.consume(subscription.group, partition, ack_wait, MAX_PENDING_PER_PARTITION) => consumer,
        };
        match consumer {
            Ok(events) => {
                let mut events = std::pin::pin!(events);
                loop {
                    let next = tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        next = events.next() => next,
                    };
                    match next {
                        Some(Ok(event)) if !wanted.contains(&event.envelope.event_type()) => {
                            event.receipt.ack().await;
                        }
                        Some(Ok(event)) => {
                            let sent = tokio::select! {
                                biased;
                                _ = stop.cancelled() => return,
                                sent = core.send(Command::Consumed { group, event }) => sent,
                            };
                            if sent.is_err() {
                                return;
                            }
                        }
                        Some(Err(e @ LogError::Corrupt { .. })) => {
                            tracing::error!(group = subscription.group, error = %e, "skipped an undecodable event");
                        }
                        Some(Err(e)) => {
                            tracing::warn!(group = subscription.group, partition, error = %e, "pulling from JetStream failed");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(group = subscription.group, partition, error = %e, "cannot pull from JetStream; retrying");
            }
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}
