//! The router's backend on NATS JetStream, for meshes that outgrow one
//! machine: the events live in a JetStream stream instead of the router's
//! SQLite file, and each group's progress in a durable consumer, so a router
//! keeps no state of its own and can be restarted anywhere.
//!
//! Layout, per namespace `ns` (one mesh; tests use one each):
//! - stream `SAGAMESH_<NS>_EVENTS` on `sagamesh.<ns>.events.<partition>`:
//!   every saga event, published with its event id as `Nats-Msg-Id`, so a
//!   publish repeated within the duplicate window is stored once. Interest
//!   retention: an event is removed once every group's consumer acked it
//!   (the log compacts itself). The partition is a hash of the transaction
//!   id, so a transaction's events share one subject;
//! - a durable pull consumer per group and partition (`<group>-p<n>`), with
//!   explicit acks: JetStream redelivers whatever the router did not ack
//!   within the ack deadline, including what a crashed router held;
//! - key-value bucket `SAGAMESH_<NS>_LEASES`: which router pulls which
//!   group's partition (`lease.<group>.<n>`), so that one router at a time
//!   delivers a transaction's events, and which routers have instances of a
//!   group attached (`member.<group>.<router>`). Entries expire unless
//!   renewed, so the leases of a router that died are free again soon;
//! - stream `SAGAMESH_<NS>_DEAD` on `sagamesh.<ns>.dead.<group>`: dead
//!   letters, the stream sequence being the dead letter's id.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::stream::{self, RawMessageErrorKind, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context, kv};
use futures_util::future::try_join_all;
use futures_util::{StreamExt, TryStreamExt};
use prost::Message as _;
use sagamesh_log::{Appended, BoxFuture, DeadLetter, DeadLetterStore, LogError};
use sagamesh_proto::v1::Envelope;

/// Subjects a transaction's events are spread over. Fixed for the life of a
/// stream: a transaction must always map to the same subject.
pub const PARTITIONS: u32 = 16;
/// How long JetStream remembers an event id to drop a repeated publish.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How long to wait for the server when connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Dead letters looked at, at most, to answer one list request.
const DEAD_LETTER_SCAN: u64 = 10_000;

const GROUP_HEADER: &str = "Sagamesh-Group";
const ATTEMPTS_HEADER: &str = "Sagamesh-Attempts";
const ERROR_HEADER: &str = "Sagamesh-Last-Error";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot reach NATS at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the namespace '{0}' is not valid: use 1 to 32 letters, digits, '-' or '_'")]
    BadNamespace(String),
    #[error("JetStream refused to set up {what}: {reason}")]
    Setup { what: String, reason: String },
}

/// One mesh's streams on one NATS server; cheap to clone.
#[derive(Clone)]
pub struct JetStream {
    context: Arc<Context>,
    namespace: String,
    events: Arc<stream::Stream>,
    dead: Arc<stream::Stream>,
}

/// An event a group's consumer handed over, with what acks it.
pub struct Consumed {
    pub envelope: Arc<Envelope>,
    /// The event's sequence in the stream: the same on every redelivery.
    pub sequence: u64,
    /// How many times JetStream has delivered it to this group, this one
    /// included.
    pub delivered: u32,
    pub receipt: Receipt,
}

/// Acks one consumed event to JetStream.
pub struct Receipt(Box<Acker>);

impl Receipt {
    /// Tells JetStream the group is done with the event. Fire and forget: an
    /// ack lost on the way only means the event is delivered again, which
    /// handlers absorb.
    pub async fn ack(self) {
        if let Err(e) = self.0.ack().await {
            tracing::warn!(error = %e, "could not ack an event to JetStream");
        }
    }

    /// Hands the event back: JetStream offers it again at once, before the
    /// events behind it, to whichever router pulls the partition next.
    pub async fn nak(self) {
        if let Err(e) = self.0.ack_with(AckKind::Nak(None)).await {
            tracing::warn!(error = %e, "could not hand an event back to JetStream");
        }
    }
}

/// The routers' leases and memberships (see the crate documentation).
#[derive(Clone)]
pub struct Leases {
    kv: kv::Store,
}

impl Leases {
    /// Takes `key` if nobody holds it; returns the revision to renew it by.
    pub async fn take(&self, key: &str, holder: &str) -> Result<Option<u64>, LogError> {
        match self.kv.create(key, holder.to_owned().into()).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(storage(e)),
        }
    }

    /// Renews a held key; `None` when it was lost (expired and taken, or
    /// deleted) meanwhile.
    pub async fn renew(&self, key: &str, holder: &str, revision: u64) -> Result<Option<u64>, LogError> {
        match self.kv.update(key, holder.to_owned().into(), revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(storage(e)),
        }
    }

    /// Gives a held key up.
    pub async fn release(&self, key: &str, revision: u64) -> Result<(), LogError> {
        self.kv
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(storage)
    }

    /// Writes `key` (a membership), whoever held it.
    pub async fn announce(&self, key: &str, holder: &str) -> Result<(), LogError> {
        self.kv
            .put(key, holder.to_owned().into())
            .await
            .map_err(storage)?;
        Ok(())
    }

    /// Every live key.
    pub async fn keys(&self) -> Result<Vec<String>, LogError> {
        let keys = self.kv.keys().await.map_err(storage)?;
        keys.try_collect().await.map_err(storage)
    }
}

impl JetStream {
    /// Connects and makes sure the namespace's streams exist.
    pub async fn connect(url: &str, namespace: &str) -> Result<JetStream, BusError> {
        let valid = !namespace.is_empty()
            && namespace.len() <= 32
            && namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(BusError::BadNamespace(namespace.to_owned()));
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(url)
            .await
            .map_err(|e| BusError::Unreachable {
                url: without_credentials(url),
                reason: e.to_string(),
            })?;
        let context = jetstream::new(client);
        let upper = namespace.to_ascii_uppercase().replace('-', "_");
        let events = ensure_stream(
            &context,
            stream::Config {
                name: format!("SAGAMESH_{upper}_EVENTS"),
                subjects: vec![format!("sagamesh.{namespace}.events.>")],
                retention: RetentionPolicy::Interest,
                storage: StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            },
        )
        .await?;
        let dead = ensure_stream(
            &context,
            stream::Config {
                name: format!("SAGAMESH_{upper}_DEAD"),
                subjects: vec![format!("sagamesh.{namespace}.dead.>")],
                retention: RetentionPolicy::Limits,
                storage: StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        Ok(JetStream {
            context: Arc::new(context),
            namespace: namespace.to_owned(),
            events: Arc::new(events),
            dead: Arc::new(dead),
        })
    }

    /// The subject of a transaction's events.
    fn event_subject(&self, transaction_id: &str) -> String {
        format!(
            "sagamesh.{}.events.{}",
            self.namespace,
            partition_of(transaction_id)
        )
    }

    /// Publishes the events in order; returns once JetStream stored them
    /// (or found them already stored: a duplicate).
    pub async fn publish(&self, events: &[Arc<Envelope>]) -> Result<Vec<Appended>, LogError> {
        // Every publish goes out before any ack is awaited: one round trip
        // for the whole batch, and the order on the connection is the order
        // in the stream.
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, event.event_id.as_str());
            let ack = self
                .context
                .publish_with_headers(
                    self.event_subject(&event.transaction_id),
                    headers,
                    event.encode_to_vec().into(),
                )
                .await
                .map_err(storage)?;
            acks.push(ack);
        }
        let acks = try_join_all(acks.into_iter().map(|ack| ack.into_future()))
            .await
            .map_err(storage)?;
        Ok(acks
            .into_iter()
            .map(|ack| {
                if ack.duplicate {
                    Appended::Duplicate
                } else {
                    Appended::New(ack.sequence)
                }
            })
            .collect())
    }

    /// The events of one partition for `group`, from its durable consumer
    /// (made if missing): every event it has not acked, in stream order,
    /// redelivered when an ack does not come within `ack_wait` (or at once
    /// after a nak). At most `max_pending` are out unacked at once.
    pub async fn consume(
        &self,
        group: &str,
        partition: u32,
        ack_wait: Duration,
        max_pending: usize,
    ) -> Result<impl futures_util::Stream<Item = Result<Consumed, LogError>> + use<>, LogError> {
        let consumer = self.consumer(group, partition, ack_wait, max_pending).await?;
        let messages = consumer.messages().await.map_err(storage)?;
        Ok(messages.then(|message| async move {
            let message = message.map_err(storage)?;
            let (sequence, delivered) = {
                let info = message.info().map_err(storage)?;
                (info.stream_sequence, info.delivered.max(1) as u32)
            };
            let (message, acker) = message.split();
            match Envelope::decode(message.payload) {
                Ok(envelope) => Ok(Consumed {
                    envelope: Arc::new(envelope),
                    sequence,
                    delivered,
                    receipt: Receipt(Box::new(acker)),
                }),
                Err(e) => {
                    // Not ours to deliver, and no redelivery will mend it:
                    // JetStream is told to stop offering it.
                    let _ = acker.ack_with(AckKind::Term).await;
                    Err(LogError::Corrupt {
                        offset: sequence,
                        reason: e.to_string(),
                    })
                }
            }
        }))
    }

    async fn consumer(
        &self,
        group: &str,
        partition: u32,
        ack_wait: Duration,
        max_pending: usize,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, LogError> {
        let name = format!("{group}-p{partition}");
        self.events
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait,
                    max_ack_pending: max_pending as i64,
                    filter_subject: format!("sagamesh.{}.events.{partition}", self.namespace),
                    ..Default::default()
                },
            )
            .await
            .map_err(storage)
    }

    /// Makes every group's consumers exist, so that Interest retention keeps
    /// each event until all of them acked it, even before a router pulls.
    pub async fn ensure_consumers(
        &self,
        groups: &[&str],
        ack_wait: Duration,
        max_pending: usize,
    ) -> Result<(), LogError> {
        for group in groups {
            for partition in 0..PARTITIONS {
                self.consumer(group, partition, ack_wait, max_pending).await?;
            }
        }
        Ok(())
    }

    /// The leases and memberships of the namespace's routers, which expire
    /// `ttl` after they were last renewed.
    pub async fn leases(&self, ttl: Duration) -> Result<Leases, LogError> {
        let bucket = self.leases_bucket();
        // The bucket's stream is made here rather than by the client's
        // bucket creation, whose request the JetStream 2.9 servers we
        // support answer in a form the client does not parse.
        ensure_stream(
            &self.context,
            stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: ttl,
                duplicate_window: ttl.min(DUPLICATE_WINDOW),
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                storage: StorageType::File,
                ..Default::default()
            },
        )
        .await
        .map_err(storage)?;
        let kv = self.context.get_key_value(&bucket).await.map_err(storage)?;
        Ok(Leases { kv })
    }

    /// The lease bucket's name: `SAGAMESH_<NS>_LEASES`.
    fn leases_bucket(&self) -> String {
        let events = &self.events.cached_info().config.name;
        format!("{}_LEASES", events.trim_end_matches("_EVENTS"))
    }

    /// Deletes the namespace's streams and consumers (tests clean up with it).
    pub async fn delete(self) -> Result<(), LogError> {
        let leases = format!("KV_{}", self.leases_bucket());
        for name in [
            &self.events.cached_info().config.name,
            &self.dead.cached_info().config.name,
        ] {
            self.context.delete_stream(name).await.map_err(storage)?;
        }
        // The leases bucket exists only once a router started.
        let _ = self.context.delete_stream(&leases).await;
        Ok(())
    }

    async fn dead_letter_at(&self, id: u64) -> Result<Option<DeadLetter>, LogError> {
        let message = match self.dead.get_raw_message(id).await {
            Ok(message) => message,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let envelope = Envelope::decode(message.payload.clone()).map_err(|e| LogError::Corrupt {
            offset: id,
            reason: e.to_string(),
        })?;
        let nanos = message.time.unix_timestamp_nanos().max(0) as u64;
        Ok(Some(DeadLetter {
            id,
            group: header(GROUP_HEADER),
            envelope: Arc::new(envelope),
            attempts: header(ATTEMPTS_HEADER).parse().unwrap_or(0),
            last_error: header(ERROR_HEADER),
            dead_at: UNIX_EPOCH + Duration::from_nanos(nanos),
        }))
    }
}

async fn ensure_stream(context: &Context, config: stream::Config) -> Result<stream::Stream, BusError> {
    let name = config.name.clone();
    context
        .get_or_create_stream(config)
        .await
        .map_err(|e| BusError::Setup {
            what: format!("stream {name}"),
            reason: e.to_string(),
        })
}

/// The partition of a transaction: FNV-1a of its id, stable across builds.
pub fn partition_of(transaction_id: &str) -> u32 {
    let hash = transaction_id.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    hash % PARTITIONS
}

fn storage(e: impl std::fmt::Display) -> LogError {
    LogError::Storage(format!("JetStream: {e}"))
}

/// A header value on one line, as NATS headers require.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

impl DeadLetterStore for JetStream {
    fn put_dead_letter(
        &self,
        group: String,
        envelope: Arc<Envelope>,
        attempts: u32,
        last_error: String,
    ) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move {
            let mut headers = HeaderMap::new();
            headers.insert(GROUP_HEADER, group.as_str());
            headers.insert(ATTEMPTS_HEADER, attempts.to_string().as_str());
            headers.insert(ERROR_HEADER, one_line(&last_error).as_str());
            let ack = self
                .context
                .publish_with_headers(
                    format!("sagamesh.{}.dead.{group}", self.namespace),
                    headers,
                    envelope.encode_to_vec().into(),
                )
                .await
                .map_err(storage)?
                .await
                .map_err(storage)?;
            Ok(ack.sequence)
        })
    }

    fn list_dead_letters(
        &self,
        group: Option<String>,
        before_id: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<DeadLetter>, LogError>> {
        Box::pin(async move {
            let mut dead = (*self.dead).clone();
            let state = dead.info().await.map_err(storage)?.state.clone();
            if state.messages == 0 {
                return Ok(Vec::new());
            }
            let mut id = if before_id == 0 {
                state.last_sequence
            } else {
                before_id.saturating_sub(1).min(state.last_sequence)
            };
            let mut found = Vec::new();
            let mut scanned = 0;
            while id >= state.first_sequence.max(1) && found.len() < limit && scanned < DEAD_LETTER_SCAN {
                scanned += 1;
                if let Some(letter) = self.dead_letter_at(id).await?
                    && group.as_ref().is_none_or(|g| *g == letter.group)
                {
                    found.push(letter);
                }
                id -= 1;
            }
            Ok(found)
        })
    }

    fn get_dead_letter(&self, id: u64) -> BoxFuture<'_, Result<Option<DeadLetter>, LogError>> {
        Box::pin(async move {
            if id == 0 {
                return Ok(None);
            }
            self.dead_letter_at(id).await
        })
    }

    fn delete_dead_letter(&self, id: u64) -> BoxFuture<'_, Result<bool, LogError>> {
        Box::pin(async move {
            if self.dead_letter_at(id).await?.is_none() {
                return Ok(false);
            }
            self.dead.delete_message(id).await.map_err(storage)
        })
    }
}

/// A NATS address for messages and logs: each server of the list without
/// the user and password it may carry (`nats://user:pass@host:4222` reads
/// `nats://***@host:4222`).
pub fn without_credentials(url: &str) -> String {
    url.split(',')
        .map(|server| {
            let (scheme, rest) = server.split_once("://").unwrap_or(("", server));
            let rest = match rest.rfind('@') {
                Some(at) => format!("***{}", &rest[at..]),
                None => rest.to_owned(),
            };
            if scheme.is_empty() {
                rest
            } else {
                format!("{scheme}://{rest}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::without_credentials;

    #[test]
    fn a_nats_address_is_shown_without_its_credentials() {
        assert_eq!(
            without_credentials("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            without_credentials("nats://app:s3/cret@nats-1:4222,tls://tok3n@nats-2:4222"),
            "nats://***@nats-1:4222,tls://***@nats-2:4222"
        );
    }
}
