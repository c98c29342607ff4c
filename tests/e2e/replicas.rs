//! Replicas: two routers, two instances of every handler and two
//! coordinators share their events through NATS JetStream and their state
//! in PostgreSQL. Each instance takes part of the work; one instance of each
//! kind is SIGKILLed mid-load, and the others finish every saga.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sagamesh_proto::v1::{PurchaseRequest, StreamTransactionRequest, TransactionStatus};
use tokio::sync::Mutex;

use crate::support::{Clients, HANDLERS, MarkerCounts, Process, distributed, wait_serving};

const USERS: usize = 16;
const BALANCE: u64 = 10_000;
const STOCK: u64 = 300;
const PRICE: u64 = 3;
/// Purchases accepted before one instance of each kind is killed, at least.
const BEFORE_KILL: usize = 500;
/// Purchases each buyer still makes after the kill (if its coordinator
/// lives).
const AFTER_KILL: u32 = 20;
/// How long the routers may take to split the partitions so that every
/// instance gets work.
const WORK_EVERYWHERE_WITHIN: Duration = Duration::from_secs(90);

struct Instance {
    name: String,
    process: Process,
    counts: MarkerCounts,
}

impl Instance {
    fn start(name: &str, index: usize, args: &[&str]) -> Instance {
        let counts: MarkerCounts = Arc::new(Default::default());
        let label = format!("{name}-{index}");
        let process = Process::try_start(&label, args, &[], "127.0.0.1:0", Some(counts.clone()))
            .unwrap_or_else(|e| panic!("{label} did not start: {e}"));
        Instance {
            name: label,
            process,
            counts,
        }
    }

    /// Steps done and compensation moves, from its log.
    fn work(&self) -> usize {
        self.counts[4].load(Ordering::Relaxed) + self.counts[5].load(Ordering::Relaxed)
    }
}

#[tokio::test]
async fn two_instances_of_everything_share_the_work_and_finish_it_when_one_of_each_dies() {
    distributed(
        "two_instances_of_everything_share_the_work_and_finish_it_when_one_of_each_dies",
        async {
            let dir = tempfile::tempdir().unwrap();
            let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
            // Instance i of every service attaches to router i.
            let mut routers: Vec<Instance> = (0..2)
                .map(|index| {
                    let data = path(&format!("router-{index}"));
                    Instance::start("router", index, &["router", "--data-dir", &data])
                })
                .collect();
            let router_addresses: Vec<String> =
                routers.iter().map(|r| r.process.address.to_string()).collect();
            let mut handlers: Vec<Instance> = Vec::new();
            for name in HANDLERS {
                for (index, router) in router_addresses.iter().enumerate() {
                    let data = path(&format!("{name}-{index}"));
                    let args = ["handler", name, "--data-dir", &data, "--router", router];
                    handlers.push(Instance::start(name, index, &args));
                }
            }
            let addresses: std::collections::HashMap<String, String> = handlers
                .iter()
                .map(|h| (h.name.clone(), h.process.address.to_string()))
                .collect();
            let address = |name: &str| addresses[name].clone();
            let mut coordinators: Vec<Instance> = (0..2)
                .map(|index| {
                    let data = path(&format!("coordinator-{index}"));
                    let inventory = address(&format!("inventory-{index}"));
                    let args = [
                        "coordinator",
                        "--data-dir",
                        &data,
                        "--router",
                        &router_addresses[index],
                        "--inventory",
                        &inventory,
                    ];
                    Instance::start("coordinator", index, &args)
                })
                .collect();
            let fronts: Vec<Clients> = coordinators
                .iter()
                .map(|c| Clients::new(c.process.address))
                .collect();
            for front in &fronts {
                wait_serving(front).await;
            }
            let wallets = Clients::new(address("wallets-1").parse().unwrap());
            let inventory = Clients::new(address("inventory-1").parse().unwrap());
            let users: Vec<String> = (0..USERS).map(|i| format!("user-{i}")).collect();
            for user in &users {
                wallets.create_user(user, BALANCE).await;
            }
            inventory.create_item("gem", PRICE, STOCK).await;

            // Buyers on both coordinators; the stock runs out early, so most
            // later purchases fail and are compensated.
            // Buyers go on until told to wind down, so every instance gets
            // work however long the routers take to split the partitions.
            let accepted = Arc::new(Mutex::new(Vec::new()));
            let killed = Arc::new(AtomicBool::new(false));
            let mut buyers = Vec::new();
            for (index, user) in users.iter().enumerate() {
                let front = fronts[index % 2].clone();
                let (user, accepted, killed) = (user.clone(), accepted.clone(), killed.clone());
                buyers.push(tokio::spawn(async move {
                    let mut mine = 0usize;
                    let mut after_kill = 0;
                    for round in 0u32.. {
                        if killed.load(Ordering::Relaxed) {
                            after_kill += 1;
                            if after_kill > AFTER_KILL {
                                break;
                            }
                        }
                        let request = PurchaseRequest {
                            user_id: user.clone(),
                            item_id: "gem".into(),
                            quantity: 1 + (round + index as u32) % 2,
                            idempotency_key: String::new(),
                        };
                        // A closed loop: each buyer waits for its purchase
                        // to end before the next one.
                        let bought = async {
                            let response = front.coordinator.clone().purchase(request).await?;
                            let id = response.into_inner().transaction_id;
                            accepted.lock().await.push(id.clone());
                            mine += 1;
                            let follow = StreamTransactionRequest { transaction_id: id };
                            let mut updates =
                                front.coordinator.clone().stream_transaction(follow).await?.into_inner();
                            while updates.message().await?.is_some() {}
                            Ok::<(), tonic::Status>(())
                        };
                        // Its coordinator was killed.
                        if let Err(e) = bought.await {
                            eprintln!("buyer {index} stops: {e}");
                            break;
                        }
                    }
                    (index % 2, mine)
                }));
            }
            // Every instance takes part (the routers split the partitions
            // between them within seconds) before one of each is killed.
            let started = Instant::now();
            let mut poll = tokio::time::interval(Duration::from_millis(10));
            loop {
                poll.tick().await;
                let idle: Vec<&str> = handlers
                    .iter()
                    .filter(|h| h.work() == 0)
                    .map(|h| h.name.as_str())
                    .collect();
                let accepted = accepted.lock().await.len();
                if accepted >= BEFORE_KILL && idle.is_empty() {
                    break;
                }
                assert!(
                    started.elapsed() < WORK_EVERYWHERE_WITHIN,
                    "after {WORK_EVERYWHERE_WITHIN:?}, {accepted} purchases were accepted and these instances had done no work: {idle:?}"
                );
            }
            for instance in handlers.iter_mut().filter(|h| h.name.ends_with("-0")) {
                instance.process.kill();
            }
            coordinators[0].process.kill();
            routers[0].process.kill();
            killed.store(true, Ordering::Relaxed);
            let mut per_coordinator = [0usize; 2];
            for buyer in buyers {
                let (coordinator, mine) = buyer.await.unwrap();
                per_coordinator[coordinator] += mine;
            }
            assert!(
                per_coordinator.iter().all(|n| *n > 0),
                "both coordinators took purchases: {per_coordinator:?}"
            );

            // The survivors finish every saga, whichever coordinator took it.
            let front = &fronts[1];
            let ids = accepted.lock().await.clone();
            let (mut spent, mut granted, mut failed) = (0, 0, 0);
            for id in &ids {
                let (_, done) = front.follow(id).await;
                match done.status() {
                    TransactionStatus::Completed => {
                        spent += done.total_price;
                        granted += u64::from(done.quantity);
                    }
                    TransactionStatus::Failed => failed += 1,
                    other => panic!("saga {id} ended {other:?}: {done:?}"),
                }
            }
            assert!(failed > 0 && granted > 0, "both outcomes happened");
            let wallets = Clients::new(address("wallets-1").parse().unwrap());
            let mut balances = 0;
            let mut held = 0;
            for user in &users {
                balances += wallets.balance(user).await;
                held += inventory.held(user, "gem").await;
            }
            assert_eq!(balances + spent, USERS as u64 * BALANCE, "money is conserved");
            assert_eq!(held, granted, "every granted gem belongs to a completed purchase");
            assert_eq!(inventory.stock("gem").await + held, STOCK, "stock is conserved");
            for instance in &handlers {
                assert!(instance.work() > 0, "{} did no work", instance.name);
            }
        },
    )
    .await;
}
