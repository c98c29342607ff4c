//! The fault-injection test: separate processes of the built binary under a
//! load of purchases with a mix of outcomes, while a driver SIGKILLs a
//! random process every few hundred milliseconds and restarts it, the router
//! drops streams and handlers fail transiently. Once every saga has ended it
//! checks invariants over the whole history and fails on any violation.
//!
//! Knobs (environment): `SAGAMESH_CHAOS_SEED` replays a run (the seed is
//! printed), `SAGAMESH_CHAOS_PURCHASES` (default 2000) and
//! `SAGAMESH_CHAOS_KILL_MS` (default 300) make a longer soak.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sagamesh_proto::v1::step_record::Status as StepStatus;
use sagamesh_proto::v1::{
    EventType, GetTransactionRequest, ListDeadLettersRequest, PurchaseRequest, ReplayDeadLetterRequest,
    SagaMode, Step, Transaction, TransactionStatus,
};
use tokio::sync::Mutex;

use crate::support::{Clients, LOG_MARKERS, MarkerCounts, Process, mode_arg, wait_serving};

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const SERVICES: [&str; 7] = [
    "router",
    "wallets",
    "inventory",
    "purchase-log",
    "notifications",
    "compensation",
    "coordinator",
];

/// Business failures by chance per saga, transient handler errors per try.
const STEP_FAULTS: &str =
    "log_record=fail@0.04,notification=fail@0.03,user_validation=error@0.03,item_grant=error@0.03";
/// The router breaks a stream on this share of delivery batches.
const ROUTER_FAULTS: &str = "router=drop_stream@0.003";

/// Every process of the mesh, restartable on its own address and data.
struct Cluster {
    dir: PathBuf,
    mode: SagaMode,
    addresses: HashMap<&'static str, String>,
    processes: HashMap<&'static str, Process>,
    counts: MarkerCounts,
}

impl Cluster {
    fn args(&self, name: &'static str) -> Vec<String> {
        let data = self.dir.join(name).to_str().unwrap().to_owned();
        let mut args: Vec<String> = match name {
            "router" => vec!["router".into(), "--max-attempts".into(), "50".into()],
            "coordinator" => vec![
                "coordinator".into(),
                "--router".into(),
                self.addresses["router"].clone(),
                "--inventory".into(),
                self.addresses["inventory"].clone(),
            ],
            handler => vec![
                "handler".into(),
                handler.into(),
                "--router".into(),
                self.addresses["router"].clone(),
            ],
        };
        args.extend([
            "--data-dir".into(),
            data,
            "--mode".into(),
            mode_arg(self.mode).into(),
            "--ack-deadline-ms".into(),
            "3000".into(),
            "--retry-base-ms".into(),
            "10".into(),
            "--retry-max-ms".into(),
            "200".into(),
        ]);
        args
    }

    fn start(&mut self, name: &'static str) {
        let args = self.args(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let faults = if name == "router" {
            ROUTER_FAULTS
        } else {
            STEP_FAULTS
        };
        let listen = self
            .addresses
            .get(name)
            .cloned()
            .unwrap_or_else(|| "127.0.0.1:0".into());
        // A killed process's port can take a moment to be free again.
        let mut last_error = String::new();
        for _ in 0..20 {
            match Process::try_start(
                name,
                &args,
                &[("SAGAMESH_FAULTS", faults)],
                &listen,
                Some(self.counts.clone()),
            ) {
                Ok(process) => {
                    self.addresses.insert(name, process.address.to_string());
                    self.processes.insert(name, process);
                    return;
                }
                Err(e) => last_error = e,
            }
        }
        panic!("{name} did not restart on {listen}: {last_error}");
    }

    fn kill(&mut self, name: &'static str) {
        if let Some(process) = self.processes.get_mut(name) {
            process.kill();
        }
    }

    fn count(&self, marker: &str) -> usize {
        let index = LOG_MARKERS
            .iter()
            .position(|m| *m == marker)
            .expect("a known marker");
        self.counts[index].load(Ordering::Relaxed)
    }
}

/// One logical purchase: sent until the coordinator answers, always with
/// its idempotency key.
#[derive(Clone)]
struct Order {
    user: String,
    item: String,
    quantity: u32,
    key: String,
}

#[tokio::test]
async fn chaos_kills_and_drops_lose_nothing_and_double_nothing() {
    let seed = knob(
        "SAGAMESH_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    let purchases = knob("SAGAMESH_CHAOS_PURCHASES", 2_000) as usize;
    let kill_every = Duration::from_millis(knob("SAGAMESH_CHAOS_KILL_MS", 300));
    let mut rng = StdRng::seed_from_u64(seed);
    let mode = if rng.random_bool(0.5) {
        SagaMode::Choreography
    } else {
        SagaMode::Orchestration
    };
    eprintln!(
        "chaos: seed {seed} (SAGAMESH_CHAOS_SEED={seed} replays it), {} mode, {purchases} purchases, a kill every ~{kill_every:?}",
        mode_arg(mode)
    );

    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster {
        dir: dir.path().to_path_buf(),
        mode,
        addresses: HashMap::new(),
        processes: HashMap::new(),
        counts: Arc::new(Default::default()),
    };
    for name in SERVICES {
        cluster.start(name);
    }
    let front = Clients::new(cluster.addresses["coordinator"].parse().unwrap());
    let wallets = Clients::new(cluster.addresses["wallets"].parse().unwrap());
    let inventory = Clients::new(cluster.addresses["inventory"].parse().unwrap());
    let router = Clients::new(cluster.addresses["router"].parse().unwrap());
    wait_serving(&front).await;

    // Users, some too poor for much; items, some soon sold out. Money and
    // stock grow with the load, so a soak keeps its mix of outcomes.
    let scale = (purchases as u64 / 2_000).max(1);
    let mut balances = BTreeMap::new();
    for u in 0..40 {
        let balance = if u % 5 == 0 {
            rng.random_range(0..300)
        } else {
            rng.random_range(2_000..20_000) * scale
        };
        let user = format!("user-{u}");
        wallets.create_user(&user, balance).await;
        balances.insert(user, balance);
    }
    let mut stocks = BTreeMap::new();
    for i in 0..6 {
        let stock = if i == 0 {
            30
        } else {
            rng.random_range(200..2_000) * scale
        };
        let item = format!("item-{i}");
        inventory
            .create_item(&item, rng.random_range(10..200), stock)
            .await;
        stocks.insert(item, stock);
    }
    let users: Vec<String> = balances.keys().cloned().collect();
    let items: Vec<String> = stocks.keys().cloned().collect();
    let mut orders: Vec<Order> = Vec::with_capacity(purchases);
    for n in 0..purchases {
        // One in ten repeats an earlier purchase, key and all.
        if n > 0 && rng.random_bool(0.1) {
            let again = orders[rng.random_range(0..n)].clone();
            orders.push(again);
            continue;
        }
        orders.push(Order {
            user: users[rng.random_range(0..users.len())].clone(),
            item: items[rng.random_range(0..items.len())].clone(),
            quantity: rng.random_range(1..=3),
            key: format!("order-{n}"),
        });
    }

    // The load: 16 clients, each retrying an order until it is answered,
    // then following its saga.
    let orders = Arc::new(orders);
    let next = Arc::new(AtomicUsize::new(0));
    let answered: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let retries = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (orders, next, answered, retries, front) = (
            orders.clone(),
            next.clone(),
            answered.clone(),
            retries.clone(),
            front.clone(),
        );
        clients.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(order) = orders.get(n) else { return };
                let started = Instant::now();
                let transaction_id = loop {
                    let request = PurchaseRequest {
                        user_id: order.user.clone(),
                        item_id: order.item.clone(),
                        quantity: order.quantity,
                        idempotency_key: order.key.clone(),
                    };
                    match front.coordinator.clone().purchase(request).await {
                        Ok(response) => break response.into_inner().transaction_id,
                        Err(status) => {
                            assert!(
                                started.elapsed() < Duration::from_secs(120),
                                "order {n} never answered: {status}"
                            );
                            retries.fetch_add(1, Ordering::Relaxed);
                            let pause = Instant::now() + Duration::from_millis(20);
                            tokio::time::sleep_until(pause.into()).await;
                        }
                    }
                };
                answered
                    .lock()
                    .await
                    .entry(order.key.clone())
                    .or_default()
                    .push(transaction_id.clone());
                // A closed loop: the next order waits for this saga (for a
                // while), so the load spans the driver's kills.
                let mut poll = tokio::time::interval(Duration::from_millis(5));
                let waiting = Instant::now();
                while waiting.elapsed() < Duration::from_secs(10) {
                    poll.tick().await;
                    let request = GetTransactionRequest {
                        transaction_id: transaction_id.clone(),
                    };
                    if let Ok(t) = front.coordinator.clone().get_transaction(request).await
                        && sagamesh_coordinator::is_terminal(t.get_ref().status())
                    {
                        break;
                    }
                }
            }
        }));
    }

    // The driver: kill a random process every few hundred milliseconds and
    // start it again on the same address and data.
    let loading = Arc::new(AtomicBool::new(true));
    let driver = {
        let loading = loading.clone();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        tokio::task::spawn_blocking(move || {
            let mut kills = 0usize;
            while loading.load(Ordering::Relaxed) {
                let pause = kill_every.mul_f64(rng.random_range(0.5..1.5));
                std::thread::park_timeout(pause);
                let victim = SERVICES[rng.random_range(0..SERVICES.len())];
                cluster.kill(victim);
                cluster.start(victim);
                kills += 1;
            }
            (cluster, kills)
        })
    };
    for client in clients {
        client.await.expect("a load client panicked");
    }
    loading.store(false, Ordering::Relaxed);
    let (cluster, kills) = driver.await.unwrap();
    let load_done = Instant::now();

    // Every saga must end. Dead letters are replayed, as an operator would.
    let answered = answered.lock().await.clone();
    let mut transactions: BTreeMap<String, Transaction> = BTreeMap::new();
    let mut dead_letters = 0;
    let mut pending: Vec<String> = answered.values().flatten().cloned().collect();
    pending.sort();
    pending.dedup();
    while !pending.is_empty() {
        assert!(
            load_done.elapsed() < Duration::from_secs(180),
            "{} sagas did not end, e.g. {:?}",
            pending.len(),
            front.transaction(&pending[0]).await
        );
        let mut still = Vec::new();
        for id in pending {
            let transaction = front.transaction(&id).await;
            if sagamesh_coordinator::is_terminal(transaction.status()) {
                transactions.insert(id, transaction);
            } else {
                still.push(id);
            }
        }
        pending = still;
        let letters = router
            .router
            .clone()
            .list_dead_letters(ListDeadLettersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .dead_letters;
        for letter in letters {
            dead_letters += 1;
            let _ = router
                .router
                .clone()
                .replay_dead_letter(ReplayDeadLetterRequest { id: letter.id })
                .await;
        }
        if !pending.is_empty() {
            let pause = Instant::now() + Duration::from_millis(100);
            tokio::time::sleep_until(pause.into()).await;
        }
    }

    // The invariants, over the whole history.
    let mut violations: Vec<String> = Vec::new();
    for (key, ids) in &answered {
        let mut distinct = ids.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() != 1 {
            violations.push(format!(
                "idempotency key {key} produced {} transactions: {distinct:?}",
                distinct.len()
            ));
        }
    }
    let mut spent: BTreeMap<&str, u64> = BTreeMap::new();
    let mut bought: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, t) in &transactions {
        if t.mode() != mode {
            violations.push(format!("{id} ran in {:?}, not {mode:?}", t.mode()));
        }
        match t.status() {
            TransactionStatus::Completed => {
                *outcomes.entry("completed").or_default() += 1;
                *spent
                    .entry(balances.keys().find(|u| **u == t.user_id).unwrap())
                    .or_default() += t.total_price;
                let user = balances.keys().find(|u| **u == t.user_id).unwrap().as_str();
                let item = stocks.keys().find(|i| **i == t.item_id).unwrap().as_str();
                *bought.entry((user, item)).or_default() += u64::from(t.quantity);
                if t.steps.len() != 4 || t.steps.iter().any(|s| s.status() != StepStatus::Success) {
                    violations.push(format!("{id} completed with steps {:?}", t.steps));
                }
            }
            TransactionStatus::Failed => {
                *outcomes.entry("failed").or_default() += 1;
                check_compensation(id, t, &mut violations);
            }
            other => violations.push(format!("{id} ended {other:?}: {}", t.failure_reason)),
        }
    }
    for (user, initial) in &balances {
        let now = wallets.balance(user).await;
        let paid = spent.get(user.as_str()).copied().unwrap_or(0);
        if now + paid != *initial {
            violations.push(format!(
                "money: {user} started with {initial}, has {now}, completed purchases cost {paid}"
            ));
        }
        for item in stocks.keys() {
            let held = inventory.held(user, item).await;
            let expected = bought.get(&(user.as_str(), item.as_str())).copied().unwrap_or(0);
            if held != expected {
                violations.push(format!(
                    "items: {user} holds {held} of {item}, completed purchases bought {expected}"
                ));
            }
        }
    }
    for (item, initial) in &stocks {
        let now = inventory.stock(item).await;
        let held: u64 = bought
            .iter()
            .filter(|((_, i), _)| i == item)
            .map(|(_, q)| q)
            .sum();
        if now + held != *initial {
            violations.push(format!(
                "stock: {item} started at {initial}, has {now}, users hold {held}"
            ));
        }
    }

    eprintln!(
        "chaos: seed {seed}, {} orders ({} distinct keys), {} sagas {:?}, {kills} kills, {} stream drops, {} redeliveries after a deadline or break, {} dead letters ({} replayed), {} client retries, {} violations",
        orders.len(),
        answered.len(),
        transactions.len(),
        outcomes,
        cluster.count("fault injection: dropping"),
        cluster.count("delivering again"),
        cluster.count("moved to the dead-letter store"),
        dead_letters,
        retries.load(Ordering::Relaxed),
        violations.len()
    );
    for violation in violations.iter().take(20) {
        eprintln!("violation: {violation}");
    }
    assert!(
        violations.is_empty(),
        "{} violations (seed {seed})",
        violations.len()
    );
    assert!(kills > 0, "the driver killed nothing");
    drop(cluster);
}

/// A failed saga: the steps before the failed one are compensated, newest
/// first.
fn check_compensation(id: &str, t: &Transaction, violations: &mut Vec<String>) {
    let Some(failed) = t.steps.iter().find(|s| s.status() == StepStatus::Failed) else {
        violations.push(format!("{id} failed without a failed step: {:?}", t.steps));
        return;
    };
    let before: Vec<Step> = sagamesh_saga::steps_to_compensate(failed.step());
    for step in &before {
        let status = t.steps.iter().find(|s| s.step() == *step).map(|s| s.status());
        if status != Some(StepStatus::Compensated) {
            violations.push(format!(
                "{id}: {step:?} is {status:?} after {:?} failed",
                failed.step()
            ));
        }
    }
    let order: Vec<Step> = t
        .history
        .iter()
        .filter_map(|h| match h.event() {
            EventType::CompensateUserValidation => Some(Step::UserValidation),
            EventType::CompensateItemGrant => Some(Step::ItemGrant),
            EventType::CompensateLogRecord => Some(Step::LogRecord),
            EventType::CompensateNotification => Some(Step::Notification),
            _ => None,
        })
        .collect();
    let mut deduped = order.clone();
    deduped.dedup();
    if deduped != before {
        violations.push(format!(
            "{id}: compensations ran {order:?}, expected newest first {before:?}"
        ));
    }
}
