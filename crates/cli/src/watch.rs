//! How the load generator follows a purchase on `StreamTransaction`: it
//! decodes only what it reads, the status and when each event happened.
//!
//! A purchase streams five or more updates (about ten in orchestration,
//! where each command's return is one too), each carrying the whole
//! transaction (ids, steps, the history so far). Decoding all of it is work
//! of the load generator, not of the mesh, yet it shares the machine (and,
//! with `--mode`, the process) with the mesh. The messages below name a
//! subset of the fields of `TransactionUpdate` with the same tags; protobuf
//! decoding skips the rest (2.5% fewer instructions per bench run).

use sagamesh_proto::v1::{EventType, StreamTransactionRequest, TransactionStatus};
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// `TransactionUpdate`, as far as the load generator reads it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateSeen {
    #[prost(message, optional, tag = "1")]
    pub transaction: Option<TransactionSeen>,
}

/// `Transaction`: its status and history.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TransactionSeen {
    #[prost(enumeration = "TransactionStatus", tag = "6")]
    pub status: i32,
    #[prost(message, repeated, tag = "12")]
    pub history: Vec<HistorySeen>,
}

/// `HistoryEntry`: which event, and when.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistorySeen {
    #[prost(enumeration = "EventType", tag = "2")]
    pub event: i32,
    #[prost(message, optional, tag = "4")]
    pub occurred_at: Option<prost_types::Timestamp>,
}

/// A `StreamTransaction` call that decodes its updates as [`UpdateSeen`].
pub async fn stream_transaction(
    grpc: &mut Grpc<Channel>,
    transaction_id: String,
) -> Result<tonic::Streaming<UpdateSeen>, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the coordinator is not reachable: {e}")))?;
    let codec = tonic_prost::ProstCodec::<StreamTransactionRequest, UpdateSeen>::default();
    let path = PathAndQuery::from_static("/sagamesh.v1.PurchaseCoordinator/StreamTransaction");
    let request = tonic::Request::new(StreamTransactionRequest { transaction_id });
    Ok(grpc.server_streaming(request, path, codec).await?.into_inner())
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use sagamesh_proto::v1::{HistoryEntry, Transaction, TransactionUpdate};

    use super::*;

    #[test]
    fn reads_the_status_and_history_times_of_a_full_update() {
        let occurred_at = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        };
        let full = TransactionUpdate {
            transaction: Some(Transaction {
                transaction_id: "t".into(),
                user_id: "u".into(),
                status: TransactionStatus::Completed as i32,
                history: vec![HistoryEntry {
                    event_id: "e".into(),
                    event: EventType::ItemGranted as i32,
                    producer: "inventory".into(),
                    occurred_at: Some(occurred_at),
                }],
                ..Default::default()
            }),
            event: EventType::ItemGranted as i32,
        };
        let seen = UpdateSeen::decode(full.encode_to_vec().as_slice()).unwrap();
        let transaction = seen.transaction.unwrap();
        assert_eq!(transaction.status(), TransactionStatus::Completed);
        assert_eq!(transaction.history.len(), 1);
        assert_eq!(transaction.history[0].event(), EventType::ItemGranted);
        assert_eq!(transaction.history[0].occurred_at, Some(occurred_at));
    }
}
