//! The `sagamesh.v1` protocol: generated messages, clients and servers.
//!
//! Everything that crosses a process boundary is defined in `proto/`; this
//! crate adds the few conversions every service needs (event types of a
//! payload, timestamps) so they are written once.

pub mod codec;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sagamesh.v1");
}

/// The encoded descriptors of every sagamesh proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sagamesh_descriptor.bin"));

/// The largest gRPC message the router's streams carry, both ways, which
/// also bounds the events of one publish.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use v1::envelope::Payload;
use v1::{Envelope, EventType, PurchaseDetails, Step, TraceContext};

impl Payload {
    /// The subscription type of this payload.
    pub fn event_type(&self) -> EventType {
        match self {
            Payload::PurchaseInitiated(_) => EventType::PurchaseInitiated,
            Payload::UserValidated(_) => EventType::UserValidated,
            Payload::UserValidationFailed(_) => EventType::UserValidationFailed,
            Payload::ItemGranted(_) => EventType::ItemGranted,
            Payload::ItemGrantFailed(_) => EventType::ItemGrantFailed,
            Payload::LogRecorded(_) => EventType::LogRecorded,
            Payload::LogFailed(_) => EventType::LogFailed,
            Payload::PurchaseCompleted(_) => EventType::PurchaseCompleted,
            Payload::NotificationFailed(_) => EventType::NotificationFailed,
            Payload::CompensateUserValidation(_) => EventType::CompensateUserValidation,
            Payload::CompensateItemGrant(_) => EventType::CompensateItemGrant,
            Payload::CompensateLogRecord(_) => EventType::CompensateLogRecord,
            Payload::CompensateNotification(_) => EventType::CompensateNotification,
            Payload::StepCompensated(_) => EventType::StepCompensated,
            Payload::StepCompensationFailed(_) => EventType::StepCompensationFailed,
            Payload::CompensationCompleted(_) => EventType::CompensationCompleted,
            Payload::PurchaseFailed(_) => EventType::PurchaseFailed,
            Payload::ExecuteUserValidation(_) => EventType::ExecuteUserValidation,
            Payload::ExecuteItemGrant(_) => EventType::ExecuteItemGrant,
            Payload::ExecuteLogRecord(_) => EventType::ExecuteLogRecord,
            Payload::ExecuteNotification(_) => EventType::ExecuteNotification,
            Payload::DeadLettered(_) => EventType::DeadLettered,
            Payload::SagaTimedOut(_) => EventType::SagaTimedOut,
        }
    }

    /// The purchase every saga event carries.
    pub fn purchase(&self) -> Option<&PurchaseDetails> {
        match self {
            Payload::PurchaseInitiated(e) => e.purchase.as_ref(),
            Payload::UserValidated(e) => e.purchase.as_ref(),
            Payload::UserValidationFailed(e) => e.purchase.as_ref(),
            Payload::ItemGranted(e) => e.purchase.as_ref(),
            Payload::ItemGrantFailed(e) => e.purchase.as_ref(),
            Payload::LogRecorded(e) => e.purchase.as_ref(),
            Payload::LogFailed(e) => e.purchase.as_ref(),
            Payload::PurchaseCompleted(e) => e.purchase.as_ref(),
            Payload::NotificationFailed(e) => e.purchase.as_ref(),
            Payload::CompensateUserValidation(e)
            | Payload::CompensateItemGrant(e)
            | Payload::CompensateLogRecord(e)
            | Payload::CompensateNotification(e) => e.purchase.as_ref(),
            Payload::StepCompensated(e) => e.purchase.as_ref(),
            Payload::StepCompensationFailed(e) => e.purchase.as_ref(),
            Payload::CompensationCompleted(e) => e.purchase.as_ref(),
            Payload::PurchaseFailed(e) => e.purchase.as_ref(),
            Payload::ExecuteUserValidation(e)
            | Payload::ExecuteItemGrant(e)
            | Payload::ExecuteLogRecord(e)
            | Payload::ExecuteNotification(e) => e.purchase.as_ref(),
            Payload::DeadLettered(_) => None,
            Payload::SagaTimedOut(e) => e.purchase.as_ref(),
        }
    }
}

impl Payload {
    /// Sets the step timing of a step's outcome event; other events have none.
    pub fn set_timing(&mut self, value: v1::StepTiming) {
        let slot = match self {
            Payload::UserValidated(e) => &mut e.timing,
            Payload::UserValidationFailed(e) => &mut e.timing,
            Payload::ItemGranted(e) => &mut e.timing,
            Payload::ItemGrantFailed(e) => &mut e.timing,
            Payload::LogRecorded(e) => &mut e.timing,
            Payload::LogFailed(e) => &mut e.timing,
            Payload::PurchaseCompleted(e) => &mut e.timing,
            Payload::NotificationFailed(e) => &mut e.timing,
            Payload::StepCompensated(e) => &mut e.timing,
            Payload::StepCompensationFailed(e) => &mut e.timing,
            _ => return,
        };
        *slot = Some(value);
    }

    /// The reason a step's failure event gives; empty for other events.
    pub fn failure_reason(&self) -> &str {
        match self {
            Payload::UserValidationFailed(e) => &e.reason,
            Payload::ItemGrantFailed(e) => &e.reason,
            Payload::LogFailed(e) => &e.reason,
            Payload::NotificationFailed(e) => &e.reason,
            _ => "",
        }
    }

    /// The step timing of a step's outcome event.
    pub fn timing(&self) -> Option<&v1::StepTiming> {
        match self {
            Payload::UserValidated(e) => e.timing.as_ref(),
            Payload::UserValidationFailed(e) => e.timing.as_ref(),
            Payload::ItemGranted(e) => e.timing.as_ref(),
            Payload::ItemGrantFailed(e) => e.timing.as_ref(),
            Payload::LogRecorded(e) => e.timing.as_ref(),
            Payload::LogFailed(e) => e.timing.as_ref(),
            Payload::PurchaseCompleted(e) => e.timing.as_ref(),
            Payload::NotificationFailed(e) => e.timing.as_ref(),
            Payload::StepCompensated(e) => e.timing.as_ref(),
            Payload::StepCompensationFailed(e) => e.timing.as_ref(),
            _ => None,
        }
    }
}

impl Envelope {
    /// The event type of the payload, `Unspecified` when there is none.
    pub fn event_type(&self) -> EventType {
        self.payload
            .as_ref()
            .map_or(EventType::Unspecified, Payload::event_type)
    }

    /// The event that `self` causes: same transaction, causation set to
    /// this event, and a child span in the same trace.
    pub fn caused(&self, producer: &str, payload: Payload) -> Envelope {
        let mut next = Envelope::new(&self.transaction_id, &self.event_id, producer, payload);
        next.trace = Some(match &self.trace {
            Some(trace) => trace.child(),
            None => TraceContext::root(&self.transaction_id),
        });
        next
    }

    /// A new envelope with a fresh UUIDv7 id, stamped now.
    pub fn new(transaction_id: &str, causation_id: &str, producer: &str, payload: Payload) -> Envelope {
        Envelope {
            event_id: uuid::Uuid::now_v7().to_string(),
            transaction_id: transaction_id.to_owned(),
            causation_id: causation_id.to_owned(),
            producer: producer.to_owned(),
            occurred_at: Some(timestamp(SystemTime::now())),
            trace: None,
            payload: Some(payload),
        }
    }
}

impl TraceContext {
    /// A new W3C trace for a saga; the trace id is derived from the
    /// transaction id, so every event of a saga shares one trace.
    pub fn root(transaction_id: &str) -> TraceContext {
        let trace_id = match uuid::Uuid::parse_str(transaction_id) {
            Ok(id) => id.simple().to_string(),
            Err(_) => uuid::Uuid::now_v7().simple().to_string(),
        };
        TraceContext {
            traceparent: format!("00-{trace_id}-{}-01", new_span_id()),
            tracestate: String::new(),
        }
    }

    /// The same trace with a new span id.
    pub fn child(&self) -> TraceContext {
        let mut parts = self.traceparent.split('-');
        match (parts.next(), parts.next()) {
            (Some(version), Some(trace_id)) if trace_id.len() == 32 => TraceContext {
                traceparent: format!("{version}-{trace_id}-{}-01", new_span_id()),
                tracestate: self.tracestate.clone(),
            },
            _ => TraceContext::root(""),
        }
    }
}

/// 16 hex digits from the random part of a UUIDv7.
fn new_span_id() -> String {
    format!("{:016x}", uuid::Uuid::now_v7().as_u64_pair().1)
}

impl v1::SagaMode {
    /// The lowercase name used by `--mode` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            v1::SagaMode::Choreography => "choreography",
            v1::SagaMode::Orchestration => "orchestration",
            v1::SagaMode::Unspecified => "unspecified",
        }
    }
}

impl Step {
    /// The snake_case name used in logs and in `SAGAMESH_FAULTS`.
    pub fn name(self) -> &'static str {
        match self {
            Step::Unspecified => "unspecified",
            Step::UserValidation => "user_validation",
            Step::ItemGrant => "item_grant",
            Step::LogRecord => "log_record",
            Step::Notification => "notification",
        }
    }
}

/// A protobuf timestamp for a system time.
pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// A system time for a protobuf timestamp (the epoch for a malformed one,
/// or one past what the platform's clock can hold).
pub fn system_time(ts: &prost_types::Timestamp) -> SystemTime {
    let nanos = u64::try_from(ts.nanos).unwrap_or(0);
    let secs = u64::try_from(ts.seconds).unwrap_or(0);
    Duration::from_secs(secs)
        .checked_add(Duration::from_nanos(nanos))
        .and_then(|since| UNIX_EPOCH.checked_add(since))
        .unwrap_or(UNIX_EPOCH)
}

/// A protobuf duration for a std duration.
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A std duration for a protobuf duration (zero for a negative one).
pub fn std_duration(d: &prost_types::Duration) -> Duration {
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u32::try_from(d.nanos).unwrap_or(0);
    Duration::new(secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_the_clock_cannot_hold_reads_as_the_epoch() {
        let far = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: i32::MAX,
        };
        assert_eq!(system_time(&far), UNIX_EPOCH);
        let before = prost_types::Timestamp {
            seconds: -5,
            nanos: 0,
        };
        assert_eq!(system_time(&before), UNIX_EPOCH);
        let now = SystemTime::now();
        let since = now.duration_since(UNIX_EPOCH).unwrap();
        let ts = prost_types::Timestamp {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        };
        assert_eq!(system_time(&ts), now);
    }

    /// The names users see in grpcurl's JSON and in clients of other
    /// languages are the specification's.
    #[test]
    fn statuses_carry_the_names_the_specification_gives() {
        use v1::step_record::Status as StepStatus;
        let steps: Vec<_> = [
            StepStatus::Success,
            StepStatus::Failed,
            StepStatus::Compensated,
            StepStatus::CompensationFailed,
        ]
        .iter()
        .map(|status| status.as_str_name())
        .collect();
        assert_eq!(steps, ["SUCCESS", "FAILED", "COMPENSATED", "COMPENSATION_FAILED"]);
        let sagas: Vec<_> = [
            v1::TransactionStatus::Initiated,
            v1::TransactionStatus::InProgress,
            v1::TransactionStatus::Completed,
            v1::TransactionStatus::Compensating,
            v1::TransactionStatus::Failed,
            v1::TransactionStatus::NeedsAttention,
        ]
        .iter()
        .map(|status| status.as_str_name())
        .collect();
        assert_eq!(
            sagas,
            [
                "INITIATED",
                "IN_PROGRESS",
                "COMPLETED",
                "COMPENSATING",
                "FAILED",
                "NEEDS_ATTENTION"
            ]
        );
    }
}
