//! Overload: a burst far past what the mesh admits is refused at once with
//! RESOURCE_EXHAUSTED, everything admitted completes, and the mesh is
//! healthy afterwards.

use sagamesh_proto::v1::{PurchaseRequest, SagaMode, TransactionStatus};
use tonic::Code;

use crate::support::{Mesh, in_both_modes};

async fn a_burst_is_refused_at_once_and_leaves_the_mesh_healthy(mode: SagaMode) {
    let mesh = Mesh::start_with(mode, |config| config.max_sagas_in_flight = 40).await;
    let c = &mesh.clients;
    c.create_user("whale", 1_000_000).await;
    c.create_item("coin", 1, 100_000).await;

    // Ten times the admitted sagas, all at once.
    let mut burst = Vec::new();
    for n in 0..400 {
        let mut coordinator = c.coordinator.clone();
        burst.push(tokio::spawn(async move {
            coordinator
                .purchase(PurchaseRequest {
                    user_id: "whale".into(),
                    item_id: "coin".into(),
                    quantity: 1,
                    idempotency_key: format!("burst-{n}"),
                })
                .await
                .map(|r| r.into_inner().transaction_id)
        }));
    }
    let mut admitted = Vec::new();
    let mut refused = 0;
    for call in burst {
        match call.await.unwrap() {
            Ok(id) => admitted.push(id),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
                assert!(status.message().contains("in progress"), "{}", status.message());
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "a burst of 400 against a limit of 40 is partly refused"
    );
    assert!(!admitted.is_empty());
    for id in &admitted {
        let (_, done) = c.follow(id).await;
        assert_eq!(done.status(), TransactionStatus::Completed);
    }

    // Healthy afterwards: new purchases are admitted and complete.
    let after = c.purchase("whale", "coin", 1).await;
    let (_, done) = c.follow(&after).await;
    assert_eq!(done.status(), TransactionStatus::Completed);
    let bought = admitted.len() as u64 + 1;
    assert_eq!(c.balance("whale").await, 1_000_000 - bought);
    assert_eq!(c.stock("coin").await, 100_000 - bought);
    let stats = c.stats().await;
    assert_eq!(stats.total, bought, "refused purchases left no saga behind");
}

in_both_modes!(a_burst_is_refused_at_once_and_leaves_the_mesh_healthy);
