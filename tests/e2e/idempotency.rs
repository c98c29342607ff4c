//! Nothing twice: idempotency keys at the front door, and redelivered or
//! republished events inside the mesh.

use sagamesh_proto::v1::envelope::Payload;
use sagamesh_proto::v1::{
    Envelope, EventType, PublishRequest, PurchaseDetails, PurchaseInitiated, PurchaseRequest, SagaMode, Step,
    TransactionStatus,
};
use tonic::Code;

use crate::support::{Mesh, eventually, in_both_modes};

async fn the_same_idempotency_key_gives_one_transaction(mode: SagaMode) {
    let mesh = Mesh::start(mode).await;
    let c = &mesh.clients;
    c.create_user("gina", 1_000).await;
    c.create_item("ring", 100, 10).await;

    let first = c.purchase_with_key("gina", "ring", 1, "order-42").await;
    let again = c.purchase_with_key("gina", "ring", 1, "order-42").await;
    assert_eq!(first, again);
    c.follow(&first).await;
    let after = c.purchase_with_key("gina", "ring", 1, "order-42").await;
    assert_eq!(first, after, "also after the saga ended");
    assert_eq!(c.balance("gina").await, 900, "charged once");
    assert_eq!(c.held("gina", "ring").await, 1);

    let other = c.purchase_with_key("gina", "ring", 1, "order-43").await;
    assert_ne!(first, other, "a new key is a new purchase");

    let reused = c
        .coordinator
        .clone()
        .purchase(PurchaseRequest {
            user_id: "gina".into(),
            item_id: "ring".into(),
            quantity: 3,
            idempotency_key: "order-42".into(),
        })
        .await
        .expect_err("a key reused for a different purchase is refused");
    assert_eq!(reused.code(), Code::FailedPrecondition);
    assert!(reused.message().contains("order-42"), "{}", reused.message());
}

async fn an_event_delivered_twice_has_one_effect(mode: SagaMode) {
    let mesh = Mesh::start(mode).await;
    let c = &mesh.clients;
    c.create_user("hank", 1_000).await;
    c.create_item("helm", 100, 10).await;
    let id = c.purchase("hank", "helm", 1).await;
    let (_, done) = c.follow(&id).await;
    assert_eq!(done.status(), TransactionStatus::Completed);

    // The wallet's trigger again, as a new event (a new id, so the router
    // does not dedupe it): the wallet must see it was done.
    let purchase = PurchaseDetails {
        user_id: "hank".into(),
        item_id: "helm".into(),
        quantity: 1,
        unit_price: 100,
        total_price: 100,
        mode: mode as i32,
    };
    let trigger = match mode {
        SagaMode::Orchestration => sagamesh_saga::execute_command(Step::UserValidation, purchase.clone()),
        _ => Payload::PurchaseInitiated(PurchaseInitiated {
            purchase: Some(purchase.clone()),
        }),
    };
    let duplicate = Envelope::new(&id, "", "test", trigger);
    // Behind it in the same transaction, a refund request: the wallet
    // handles the transaction's events in order, so once the refund is seen,
    // the duplicate was handled before it.
    let refund = Envelope::new(
        &id,
        "",
        "test",
        sagamesh_saga::compensation_request(Step::UserValidation, purchase, 7),
    );
    let published = c
        .router
        .clone()
        .publish(PublishRequest {
            request_id: 1,
            events: vec![duplicate.clone(), duplicate.clone(), refund],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (published.accepted, published.duplicates),
        (2, 1),
        "the router dedupes by event id"
    );

    eventually("the wallet to answer the refund request", || {
        let c = c.clone();
        let id = id.clone();
        async move {
            let t = c.transaction(&id).await;
            t.history
                .iter()
                .any(|h| h.event() == EventType::StepCompensated && h.producer == "wallets")
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        c.balance("hank").await,
        1_000,
        "charged once, refunded once: the duplicate charged nothing"
    );
    assert_eq!(c.held("hank", "helm").await, 1, "the duplicate granted nothing");
}

in_both_modes!(
    the_same_idempotency_key_gives_one_transaction,
    an_event_delivered_twice_has_one_effect,
);
