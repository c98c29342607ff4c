//! Bad input gets a clear error and changes nothing.

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{
    CreateItemRequest, CreateUserRequest, Envelope, GetTransactionRequest, GetUserRequest,
    ListTransactionsRequest, PublishRequest, PurchaseDetails, PurchaseRequest, SagaMode,
    StreamTransactionRequest, UserValidated,
};
use tonic::Code;

use crate::support::{Mesh, on_both_backends};

fn purchase(user_id: &str, item_id: &str, quantity: u32) -> PurchaseRequest {
    PurchaseRequest {
        user_id: user_id.into(),
        item_id: item_id.into(),
        quantity,
        idempotency_key: String::new(),
    }
}

async fn bad_requests_get_clear_errors() {
    let mesh = Mesh::start(SagaMode::Choreography).await;
    let c = &mesh.clients;
    let long = "x".repeat(200);
    let cases = [
        (purchase("", "item", 1), "user_id must not be empty"),
        (purchase("user", "", 1), "item_id must not be empty"),
        (purchase(&long, "item", 1), "user_id is 200 bytes long"),
        (purchase("user", "item", 0), "quantity must be at least 1"),
        (purchase("user", "item", 1_000_000), "more than the limit"),
        (purchase("us er", "item", 1), "printable"),
    ];
    for (request, expected) in cases {
        let status = c
            .coordinator
            .clone()
            .purchase(request)
            .await
            .expect_err("invalid purchase");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(
            status.message().contains(expected),
            "{:?} should contain {expected:?}",
            status.message()
        );
    }

    let missing = c
        .coordinator
        .clone()
        .get_transaction(GetTransactionRequest {
            transaction_id: "no-such-tx".into(),
        })
        .await
        .expect_err("unknown transaction");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("no-such-tx"));

    let stream = c
        .coordinator
        .clone()
        .stream_transaction(StreamTransactionRequest {
            transaction_id: "no-such-tx".into(),
        })
        .await
        .expect_err("NOT_FOUND before the stream opens");
    assert_eq!(stream.code(), Code::NotFound);

    let page = c
        .coordinator
        .clone()
        .list_transactions(ListTransactionsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad page token");
    assert_eq!(page.code(), Code::InvalidArgument);
    let size = c
        .coordinator
        .clone()
        .list_transactions(ListTransactionsRequest {
            page_size: 5_000,
            ..Default::default()
        })
        .await
        .expect_err("page too large");
    assert_eq!(size.code(), Code::InvalidArgument);

    let no_user = c
        .wallets
        .clone()
        .get_user(GetUserRequest {
            user_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(no_user.code(), Code::NotFound);
    c.create_user("ivy", 10).await;
    let twice = c
        .wallets
        .clone()
        .create_user(CreateUserRequest {
            user_id: "ivy".into(),
            balance: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists);
    assert_eq!(c.balance("ivy").await, 10, "the refused create changed nothing");

    let no_name = c
        .inventory
        .clone()
        .create_item(CreateItemRequest {
            item_id: "thing".into(),
            name: String::new(),
            price: 1,
            stock: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(no_name.code(), Code::InvalidArgument);

    let empty_publish = c
        .router
        .clone()
        .publish(PublishRequest {
            request_id: 1,
            events: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(empty_publish.code(), Code::InvalidArgument);

    // An event whose purchase `Purchase` would never have priced so: the
    // router refuses it before any step can act on it.
    let free = PurchaseDetails {
        user_id: "alice".into(),
        item_id: "sword".into(),
        quantity: 1_000,
        unit_price: 100,
        total_price: 0,
        mode: SagaMode::Choreography as i32,
    };
    let forged = c
        .router
        .clone()
        .publish(PublishRequest {
            request_id: 2,
            events: vec![Envelope::new(
                "tx-forged",
                "",
                "test",
                Payload::UserValidated(UserValidated {
                    purchase: Some(free),
                    ..UserValidated::default()
                }),
            )],
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);
    assert!(
        forged
            .message()
            .contains("total_price 0 is not unit_price 100 times quantity 1000"),
        "{}",
        forged.message()
    );
}

on_both_backends!(bad_requests_get_clear_errors,);

/// A `PurchaseRequest` as a broken client might send it: `user_id` is a
/// string in the proto, here any bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawPurchase {
    #[prost(bytes = "vec", tag = "1")]
    user_id: Vec<u8>,
}

/// Bytes that do not decode as the request are the caller's fault, and
/// the answer says so (prost's codec alone answers INTERNAL).
#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid_argument() {
    let mesh = Mesh::start(SagaMode::Choreography).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.clients.address))
        .unwrap()
        .connect_lazy();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("the mesh answers");
    let request = tonic::Request::new(RawPurchase {
        user_id: vec![0xff, 0xfe, 0x00],
    });
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/sagamesh.v1.PurchaseCoordinator/Purchase");
    let codec = sagamesh_proto::codec::Codec::<RawPurchase, sagamesh_proto::v1::PurchaseResponse>::default();
    let status = grpc
        .unary(request, path, codec)
        .await
        .expect_err("not a purchase");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        status.message().contains("not a valid PurchaseRequest"),
        "{}",
        status.message()
    );
    let stats = mesh.clients.stats().await;
    assert_eq!(stats.total, 0, "nothing was started");
}
