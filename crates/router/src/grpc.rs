//! The tonic face of the router: checks input, turns stream messages into
//! core commands, and maps errors to statuses. No routing rule lives here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sagamesh_proto::MAX_MESSAGE_SIZE;
use sagamesh_proto::v1::event_router_server::{EventRouter, EventRouterServer};
use sagamesh_proto::v1::{
    AttachRequest, AttachResponse, DeadLetter, DiscardDeadLetterRequest, DiscardDeadLetterResponse, Envelope,
    EventType, GetDeadLetterRequest, Hello, ListDeadLettersRequest, ListDeadLettersResponse, PublishFailed,
    PublishRequest, PublishResponse, ReplayDeadLetterRequest, ReplayDeadLetterResponse, SagaMode,
    attach_request, attach_response, envelope::Payload,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::service::{Interceptor, interceptor::InterceptedService};
use tonic::{Request, Response, Status, Streaming};

use crate::Router;
use crate::appender::Append;
use crate::core::{Command, MAX_EVENT_BYTES};

/// Most events in one publish.
const MAX_EVENTS_PER_PUBLISH: usize = 1_000;
/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes of one stream waiting to be appended, in order. When full, the
/// stream stops reading until one is done.
const STREAM_PUBLISH_QUEUE: usize = 64;

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// The router as served over gRPC.
pub type RouterServer = InterceptedService<EventRouterServer<RouterService>, RequireToken>;

/// Refuses calls that do not carry the router's token, when it has one, as
/// `authorization: Bearer <token>`. The router is how services change each
/// other's data: without a token, anyone who reaches its address can
/// publish any event.
#[derive(Clone)]
pub struct RequireToken(Option<Arc<str>>);

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented {
            Some(token) if same_secret(token.as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated(
                "the token in `authorization` is not this router's (--router-token)",
            )),
            None => Err(Status::unauthenticated(
                "this router takes calls only with its token: send `authorization: Bearer <token>` \
                 (services send it when started with --router-token or SAGAMESH_ROUTER_TOKEN)",
            )),
        }
    }
}

/// Compares secrets in time that depends on their length only.
fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    presented.len() == expected.len()
        && presented
            .iter()
            .zip(expected)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

#[derive(Clone)]
pub struct RouterService {
    router: Router,
}

impl RouterService {
    pub(crate) fn new(router: Router) -> RouterService {
        RouterService { router }
    }

    /// The service as served over gRPC. With a `token`, every call must
    /// carry it (see [`RequireToken`]); services in this process reach the
    /// router without one.
    pub fn into_server(self, token: Option<&str>) -> RouterServer {
        let server = EventRouterServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        InterceptedService::new(server, RequireToken(token.map(Arc::from)))
    }

    /// Appends checked events; answers once they are durable.
    async fn publish(&self, request_id: u64, events: Vec<Envelope>) -> Result<PublishResponse, Status> {
        check_events(&events)?;
        let (reply, answer) = oneshot::channel();
        let events = events.into_iter().map(Arc::new).collect();
        self.router
            .appender
            .send(Append { events, reply })
            .await
            .map_err(|_| Status::unavailable("the router is shutting down"))?;
        let (accepted, duplicates) = answer
            .await
            .map_err(|_| Status::unavailable("the router is shutting down"))?
            .map_err(|e| Status::unavailable(format!("the event log could not store the events: {e}")))?;
        Ok(PublishResponse {
            request_id,
            accepted,
            duplicates,
        })
    }

    /// Serves one Attach stream, whichever transport carries it: tonic's
    /// for remote instances, or channels for instances in this process.
    pub async fn attach_stream(
        &self,
        mut inbound: impl Stream<Item = Result<AttachRequest, Status>> + Send + Unpin + 'static,
    ) -> Result<AttachStream, Status> {
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 seconds of attaching"))?
            .transpose()?;
        let Some(AttachRequest {
            kind: Some(attach_request::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message on an Attach stream must be a hello",
            ));
        };
        check_hello(&hello)?;
        let takes_publish_failed = hello.takes_publish_failed;
        // Room for every delivery batch the instance may have in flight, plus
        // publish answers.
        let capacity = hello.max_in_flight.clamp(1, 4096) as usize + STREAM_PUBLISH_QUEUE;
        let (outbound, outbound_rx) = mpsc::channel(capacity);
        // The core holds the only strong sender, so when it detaches the
        // instance (a full or broken stream, fault injection) the response
        // stream ends and the handler reattaches instead of waiting on a
        // stream nobody feeds. The tasks below send through weak handles.
        let weak = outbound.downgrade();
        let instance = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let (reply, welcome) = oneshot::channel();
        self.router
            .core
            .send(Command::Attach {
                instance,
                hello,
                outbound,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("the router is shutting down"))?;
        welcome
            .await
            .map_err(|_| Status::unavailable("the router is shutting down"))??;

        // Publishes of this stream are appended in order by their own task,
        // so acks keep flowing while a publish waits for its commit. Each
        // is answered on its own, a failure too, for an instance that takes
        // `PublishFailed`: one bad publish does not end its stream and the
        // deliveries in flight on it. An older instance knows no such
        // answer and would wait for it for ever; its stream ends instead.
        let (publishes, mut publish_rx) = mpsc::channel::<PublishRequest>(STREAM_PUBLISH_QUEUE);
        let service = self.clone();
        let answers = weak.clone();
        tokio::spawn(async move {
            while let Some(publish) = publish_rx.recv().await {
                let request_id = publish.request_id;
                let answer = match service.publish(request_id, publish.events).await {
                    Ok(response) => Ok(attach_response::Kind::Published(response)),
                    Err(status) if takes_publish_failed => {
                        Ok(attach_response::Kind::PublishFailed(PublishFailed {
                            request_id,
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        }))
                    }
                    Err(status) => Err(status),
                };
                let ends = answer.is_err();
                let answer = answer.map(|kind| AttachResponse { kind: Some(kind) });
                let Some(answers) = answers.upgrade() else { break };
                if answers.send(answer).await.is_err() || ends {
                    break;
                }
            }
        });

        let core = self.router.core.clone();
        tokio::spawn(async move {
            loop {
                let message = match inbound.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(_)) | None => break,
                };
                let command = match message.kind {
                    Some(attach_request::Kind::Ack(ack)) => Command::Ack {
                        instance,
                        delivery_ids: ack.delivery_ids,
                    },
                    Some(attach_request::Kind::Processed(processed)) => Command::Processed {
                        instance,
                        delivery_ids: processed.delivery_ids,
                    },
                    Some(attach_request::Kind::Nack(nack)) => Command::Nack {
                        instance,
                        delivery_id: nack.delivery_id,
                        reason: bounded_reason(nack.reason),
                    },
                    Some(attach_request::Kind::Publish(publish)) => {
                        if publishes.send(publish).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    kind @ (Some(attach_request::Kind::Hello(_)) | None) => {
                        let refusal = match kind {
                            None => "an Attach message must carry an ack, a processed, a nack or a publish",
                            Some(_) => "only the first message on an Attach stream may be a hello",
                        };
                        if let Some(outbound) = weak.upgrade() {
                            let _ = outbound.send(Err(Status::invalid_argument(refusal))).await;
                        }
                        break;
                    }
                };
                if core.send(command).await.is_err() {
                    break;
                }
            }
            let _ = core.send(Command::Detach { instance }).await;
        });

        Ok(Box::pin(ReceiverStream::new(outbound_rx)))
    }
}

/// The longest nack reason kept. A reason becomes the dead letter's last
/// error and goes out in the `DeadLettered` notice, which must stay a
/// small event.
const MAX_REASON_BYTES: usize = 4096;

/// The most bytes of client text quoted in an error, so that an answer
/// stays small whatever was sent.
const MAX_QUOTED_BYTES: usize = 64;

/// The reason, cut at [`MAX_REASON_BYTES`].
fn bounded_reason(reason: String) -> String {
    cut(reason, MAX_REASON_BYTES)
}

/// `text` cut to at most `max` bytes on a character boundary, the cut
/// marked with `…`.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Checks an id the caller sent, in the words every service uses.
fn check_id(field: &'static str, value: &str) -> Result<(), Status> {
    sagamesh_saga::validate_id(field, value).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn check_events(events: &[Envelope]) -> Result<(), Status> {
    // The gRPC limit, kept for publishes from this process too; each event
    // must also fit a delivery to any instance on its own.
    let size: usize = events.iter().map(prost::Message::encoded_len).sum();
    if size > MAX_MESSAGE_SIZE {
        return Err(Status::invalid_argument(format!(
            "a publish may carry at most {MAX_MESSAGE_SIZE} bytes of events, not {size}"
        )));
    }
    if events.is_empty() {
        return Err(Status::invalid_argument(
            "a publish must carry at least one event",
        ));
    }
    if events.len() > MAX_EVENTS_PER_PUBLISH {
        return Err(Status::invalid_argument(format!(
            "a publish may carry at most {MAX_EVENTS_PER_PUBLISH} events, not {}",
            events.len()
        )));
    }
    for (index, event) in events.iter().enumerate() {
        let size = prost::Message::encoded_len(event);
        if size > MAX_EVENT_BYTES {
            return Err(Status::invalid_argument(format!(
                "event {index} is {size} bytes; an event may be at most {MAX_EVENT_BYTES} bytes"
            )));
        }
        if !is_canonical_uuid(&event.event_id) {
            return Err(Status::invalid_argument(format!(
                "event {index}: event_id must be a UUID written in lowercase with hyphens \
                 (8-4-4-4-12), not '{}'",
                cut(event.event_id.clone(), MAX_QUOTED_BYTES)
            )));
        }
        if let Err(e) = sagamesh_saga::validate_id("transaction_id", &event.transaction_id) {
            return Err(Status::invalid_argument(format!("event {index}: {e}")));
        }
        let Some(payload) = &event.payload else {
            return Err(Status::invalid_argument(format!(
                "event {index}: the payload is missing"
            )));
        };
        // Every saga event but the router's own notice carries the purchase
        // it is about, and the steps act on it: it must be one `Purchase`
        // would have accepted.
        if !matches!(payload, Payload::DeadLettered(_)) {
            let name = payload.event_type().as_str_name();
            let Some(purchase) = payload.purchase() else {
                return Err(Status::invalid_argument(format!(
                    "event {index}: {name} carries no purchase"
                )));
            };
            if let Err(e) = sagamesh_saga::validate_purchase(purchase) {
                return Err(Status::invalid_argument(format!(
                    "event {index}: the purchase in {name}: {e}"
                )));
            }
        }
    }
    Ok(())
}

/// Whether `id` is a UUID in the one spelling the router stores: the log
/// dedupes by the id's text, so `{...}`, `urn:uuid:`, uppercase or
/// hyphenless spellings of the same UUID would pass as new events.
fn is_canonical_uuid(id: &str) -> bool {
    uuid::Uuid::try_parse(id)
        .is_ok_and(|uuid| uuid.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()) == id)
}

/// Checks what a hello says about the instance itself; whether it fits
/// this mesh (its mode, group and subscription) is the core's to say.
fn check_hello(hello: &Hello) -> Result<(), Status> {
    match SagaMode::try_from(hello.mode) {
        Ok(SagaMode::Choreography | SagaMode::Orchestration) => {}
        Ok(SagaMode::Unspecified) => {
            return Err(Status::invalid_argument(
                "hello.mode is required: CHOREOGRAPHY or ORCHESTRATION",
            ));
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "hello.mode {} is not a saga mode (CHOREOGRAPHY or ORCHESTRATION)",
                hello.mode
            )));
        }
    }
    check_id("hello.service", &hello.service)?;
    // A hello may leave the group out (an instance that only publishes)
    // and the instance id too (it is for logs).
    for (field, value) in [
        ("hello.group", &hello.group),
        ("hello.instance_id", &hello.instance_id),
    ] {
        if !value.is_empty() {
            check_id(field, value)?;
        }
    }
    for &number in &hello.event_types {
        if !matches!(EventType::try_from(number), Ok(t) if t != EventType::Unspecified) {
            return Err(Status::invalid_argument(format!(
                "hello.event_types: {number} is not an event type"
            )));
        }
    }
    Ok(())
}

/// What a router answers on an Attach stream.
pub type AttachStream = Pin<Box<dyn Stream<Item = Result<AttachResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventRouter for RouterService {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        request: Request<Streaming<AttachRequest>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        self.attach_stream(request.into_inner()).await.map(Response::new)
    }

    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        let request = request.into_inner();
        RouterService::publish(self, request.request_id, request.events)
            .await
            .map(Response::new)
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let limit = match request.page_size {
            0 => 50,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(Status::invalid_argument(format!(
                    "page_size must be between 1 and 1000, not {n}"
                )));
            }
        };
        // Dead letters are numbered from 1 in a signed column; an id past
        // its range would wrap and list nothing.
        if request.before_id > i64::MAX as u64 {
            return Err(Status::invalid_argument(format!(
                "before_id must be a dead letter's id (at most {}), not {}",
                i64::MAX,
                request.before_id
            )));
        }
        if !request.group.is_empty() {
            check_id("group", &request.group)?;
        }
        let group = (!request.group.is_empty()).then_some(request.group);
        let letters = self
            .router
            .dead_letters
            .list_dead_letters(group, request.before_id, limit)
            .await
            .map_err(log_status)?;
        let next_before_id = if letters.len() == limit {
            letters.last().map_or(0, |d| d.id)
        } else {
            0
        };
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: letters.into_iter().map(to_proto).collect(),
            next_before_id,
        }))
    }

    async fn get_dead_letter(
        &self,
        request: Request<GetDeadLetterRequest>,
    ) -> Result<Response<DeadLetter>, Status> {
        let id = request.into_inner().id;
        let letter = self
            .router
            .dead_letters
            .get_dead_letter(id)
            .await
            .map_err(log_status)?
            .ok_or_else(|| Status::not_found(format!("there is no dead letter {id}")))?;
        Ok(Response::new(to_proto(letter)))
    }

    async fn replay_dead_letter(
        &self,
        request: Request<ReplayDeadLetterRequest>,
    ) -> Result<Response<ReplayDeadLetterResponse>, Status> {
        let id = request.into_inner().id;
        let dead_letter = self
            .router
            .dead_letters
            .get_dead_letter(id)
            .await
            .map_err(log_status)?
            .ok_or_else(|| Status::not_found(format!("there is no dead letter {id}")))?;
        let (reply, answer) = oneshot::channel();
        self.router
            .core
            .send(Command::Replay { dead_letter, reply })
            .await
            .map_err(|_| Status::unavailable("the router is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the router is shutting down"))??;
        Ok(Response::new(ReplayDeadLetterResponse {}))
    }

    async fn discard_dead_letter(
        &self,
        request: Request<DiscardDeadLetterRequest>,
    ) -> Result<Response<DiscardDeadLetterResponse>, Status> {
        let id = request.into_inner().id;
        if self
            .router
            .dead_letters
            .delete_dead_letter(id)
            .await
            .map_err(log_status)?
        {
            Ok(Response::new(DiscardDeadLetterResponse {}))
        } else {
            Err(Status::not_found(format!("there is no dead letter {id}")))
        }
    }
}

fn to_proto(letter: sagamesh_log::DeadLetter) -> DeadLetter {
    DeadLetter {
        id: letter.id,
        group: letter.group,
        envelope: Some((*letter.envelope).clone()),
        attempts: letter.attempts,
        last_error: letter.last_error,
        dead_at: Some(sagamesh_proto::timestamp(letter.dead_at)),
    }
}

fn log_status(e: sagamesh_log::LogError) -> Status {
    tracing::error!(error = %e, "event log error");
    match e {
        // Retrying cannot fix a damaged record.
        sagamesh_log::LogError::Corrupt { .. } => Status::data_loss("the event log holds a damaged record"),
        sagamesh_log::LogError::Storage(_) => Status::unavailable("the event log is unavailable; try again"),
    }
}

#[cfg(test)]
mod tests {
    use sagamesh_proto::v1::envelope::Payload;
    use sagamesh_proto::v1::{PurchaseDetails, PurchaseInitiated};

    use super::*;

    fn purchase() -> PurchaseDetails {
        PurchaseDetails {
            user_id: "user-1".into(),
            item_id: "item-1".into(),
            quantity: 2,
            unit_price: 50,
            total_price: 100,
            ..PurchaseDetails::default()
        }
    }

    fn event_of(bytes: usize) -> Envelope {
        let payload = Payload::PurchaseInitiated(PurchaseInitiated {
            purchase: Some(purchase()),
        });
        let mut event = Envelope::new("tx-1", "", "test", payload);
        event.producer = "x".repeat(bytes);
        event
    }

    fn call_with(token: Option<&str>, authorization: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        RequireToken(token.map(Arc::from)).call(request).map(|_| ())
    }

    #[test]
    fn a_router_with_a_token_takes_only_calls_that_carry_it() {
        assert!(call_with(None, None).is_ok(), "no token, no check");
        assert!(call_with(Some("s3cret"), Some("Bearer s3cret")).is_ok());
        for wrong in [None, Some("Bearer s3cre"), Some("Bearer s3cret2"), Some("s3cret")] {
            let status = call_with(Some("s3cret"), wrong).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{wrong:?}");
            assert!(status.message().contains("token"), "{}", status.message());
        }
    }

    #[test]
    fn a_long_nack_reason_is_cut_on_a_character_boundary() {
        assert_eq!(bounded_reason("short".into()), "short");
        let cut = bounded_reason("é".repeat(MAX_REASON_BYTES));
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(cut.trim_end_matches('…').chars().all(|c| c == 'é'));
    }

    #[test]
    fn an_event_too_large_for_a_delivery_is_refused_with_its_size() {
        let status = check_events(&[event_of(MAX_EVENT_BYTES)]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("event 0 is ") && status.message().contains("at most"),
            "{}",
            status.message()
        );
        assert!(check_events(&[event_of(MAX_EVENT_BYTES - 200)]).is_ok());
    }

    fn refusal(event: Envelope) -> String {
        let status = check_events(&[event]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        status.message().to_owned()
    }

    #[test]
    fn an_event_id_in_another_spelling_of_a_uuid_is_refused() {
        let event = event_of(0);
        assert!(check_events(std::slice::from_ref(&event)).is_ok());
        let id = uuid::Uuid::parse_str(&event.event_id).unwrap();
        for spelling in [
            event.event_id.to_uppercase(),
            id.braced().to_string(),
            id.urn().to_string(),
            id.simple().to_string(),
            "x".repeat(10_000),
        ] {
            let message = refusal(Envelope {
                event_id: spelling,
                ..event.clone()
            });
            assert!(message.contains("lowercase with hyphens"), "{message}");
            assert!(message.len() < 300, "a long id is not echoed whole: {message}");
        }
    }

    #[test]
    fn an_event_must_carry_a_purchase_that_purchase_would_take() {
        let missing = Envelope::new(
            "tx-1",
            "",
            "test",
            Payload::PurchaseInitiated(PurchaseInitiated { purchase: None }),
        );
        assert!(refusal(missing).contains("PURCHASE_INITIATED carries no purchase"));
        let free = Envelope::new(
            "tx-1",
            "",
            "test",
            Payload::PurchaseInitiated(PurchaseInitiated {
                purchase: Some(PurchaseDetails {
                    total_price: 0,
                    ..purchase()
                }),
            }),
        );
        let message = refusal(free);
        assert!(
            message.contains("total_price 0 is not unit_price 50 times quantity 2"),
            "{message}"
        );
        let nothing = Envelope::new(
            "tx-1",
            "",
            "test",
            Payload::PurchaseInitiated(PurchaseInitiated {
                purchase: Some(PurchaseDetails {
                    quantity: 0,
                    total_price: 0,
                    ..purchase()
                }),
            }),
        );
        assert!(refusal(nothing).contains("quantity must be at least 1"));
    }

    fn good_hello() -> Hello {
        Hello {
            service: "wallets".into(),
            group: "wallets".into(),
            event_types: vec![EventType::PurchaseInitiated as i32],
            max_in_flight: 10,
            instance_id: "instance-1".into(),
            mode: SagaMode::Choreography as i32,
            credentials: Vec::new(),
            takes_publish_failed: true,
        }
    }

    #[test]
    fn a_hello_must_name_a_mode_known_event_types_and_printable_names() {
        assert!(check_hello(&good_hello()).is_ok());
        let publisher_only = Hello {
            group: String::new(),
            event_types: Vec::new(),
            instance_id: String::new(),
            ..good_hello()
        };
        assert!(check_hello(&publisher_only).is_ok());
        let refused = |hello: Hello| {
            let status = check_hello(&hello).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            status.message().to_owned()
        };
        assert!(
            refused(Hello {
                mode: 0,
                ..good_hello()
            })
            .contains("hello.mode is required")
        );
        assert!(
            refused(Hello {
                mode: 7,
                ..good_hello()
            })
            .contains("hello.mode 7 is not a saga mode")
        );
        assert!(
            refused(Hello {
                event_types: vec![99],
                ..good_hello()
            })
            .contains("99 is not an event type")
        );
        assert!(
            refused(Hello {
                service: String::new(),
                ..good_hello()
            })
            .contains("hello.service must not be empty")
        );
        assert!(
            refused(Hello {
                instance_id: "a\nb".into(),
                ..good_hello()
            })
            .contains("hello.instance_id")
        );
        let long = refused(Hello {
            group: "g".repeat(100_000),
            ..good_hello()
        });
        assert!(long.len() < 200, "{long}");
    }
}
