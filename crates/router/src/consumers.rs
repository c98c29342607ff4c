//! On JetStream, one task per group pulls the group's durable consumer and
//! hands each event to the core, which delivers it like an event from the
//! embedded log and acks it to JetStream once the group is done with it.
//!
//! Events of types the group does not subscribe to are acked at once: the
//! consumers read the whole stream (the server this targets filters on one
//! subject per consumer), and Interest retention removes an event only once
//! every group acked it.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use sagamesh_jetstream::JetStream;
use sagamesh_log::LogError;
use sagamesh_proto::v1::EventType;
use sagamesh_saga::Subscription;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::RouterConfig;
use crate::core::Command;

/// Events a group may hold unacked (queued behind their transaction's head
/// or in flight). When reached, JetStream stops handing the group more,
/// which bounds the router's memory.
pub(crate) const MAX_PENDING_PER_GROUP: usize = 10_000;
/// How long to wait before pulling again after the consumer failed.
const RETRY: Duration = Duration::from_secs(1);
/// JetStream's ack wait is the ack deadline, capped at this: it is how long
/// an event held by a router that died waits before JetStream offers it to
/// the next one. Events a live router holds longer come back early and are
/// dropped as already held.
const MAX_ACK_WAIT: Duration = Duration::from_secs(5);

/// Makes every group's consumer exist and starts pulling them.
pub(crate) async fn start(
    bus: &JetStream,
    config: &RouterConfig,
    core: &mpsc::Sender<Command>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), LogError> {
    let groups: Vec<&str> = config.subscriptions.iter().map(|s| s.group).collect();
    let ack_wait = config.ack_deadline.min(MAX_ACK_WAIT);
    bus.ensure_consumers(&groups, ack_wait, MAX_PENDING_PER_GROUP)
        .await?;
    for (index, subscription) in config.subscriptions.iter().enumerate() {
        tasks.spawn(feed(
            bus.clone(),
            index,
            subscription.clone(),
            ack_wait,
            core.clone(),
            shutdown.clone(),
        ));
    }
    Ok(())
}

async fn feed(
    bus: JetStream,
    group: usize,
    subscription: Subscription,
    ack_wait: Duration,
    core: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let wanted: HashSet<EventType> = subscription.event_types.iter().copied().collect();
    loop {
        match bus
            .consume(subscription.group, ack_wait, MAX_PENDING_PER_GROUP)
            .await
        {
            Ok(events) => {
                let mut events = std::pin::pin!(events);
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        next = events.next() => next,
                    };
                    match next {
                        Some(Ok(event)) if !wanted.contains(&event.envelope.event_type()) => {
                            event.receipt.ack().await;
                        }
                        Some(Ok(event)) => {
                            if core.send(Command::Consumed { group, event }).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e @ LogError::Corrupt { .. })) => {
                            tracing::error!(group = subscription.group, error = %e, "skipped an undecodable event");
                        }
                        Some(Err(e)) => {
                            tracing::warn!(group = subscription.group, error = %e, "pulling from JetStream failed");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(group = subscription.group, error = %e, "cannot pull from JetStream; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}
