//! The mesh as separate processes of the built binary: one service per
//! process, crashes with SIGKILL, restarts on the same data.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sagamesh_proto::v1::{
    EventType, GetLogRequest, ListDeadLettersRequest, ListNotificationsRequest, ListTransactionsRequest,
    LogStatus, NotificationKind, PurchaseRequest, ReplayDeadLetterRequest, SagaMode, TransactionStatus,
};

use tokio::sync::Mutex;

use crate::support::{
    Clients, HANDLERS, MarkerCounts, Process, eventually, in_both_modes, mode_arg, on_both_backends,
    wait_serving,
};

/// Router, coordinator and every handler, each its own process.
struct Deployment {
    processes: HashMap<&'static str, Process>,
    dir: std::path::PathBuf,
    mode: SagaMode,
    /// Environment for every process.
    every: Vec<(&'static str, &'static str)>,
}

impl Deployment {
    fn start(dir: &Path, mode: SagaMode) -> Deployment {
        Deployment::start_with(dir, mode, &[])
    }

    /// Starts every process; `coordinator_env` goes to the coordinator.
    fn start_with(dir: &Path, mode: SagaMode, coordinator_env: &[(&str, &str)]) -> Deployment {
        Deployment::start_each(dir, mode, &[], coordinator_env)
    }

    /// Starts every process with `every` in its environment, and the
    /// coordinator with `coordinator_env` too.
    fn start_each(
        dir: &Path,
        mode: SagaMode,
        every: &[(&'static str, &'static str)],
        coordinator_env: &[(&str, &str)],
    ) -> Deployment {
        let mut deployment = Deployment {
            processes: HashMap::new(),
            dir: dir.to_path_buf(),
            mode,
            every: every.to_vec(),
        };
        let data = dir.join("router");
        let router = Process::start(
            "router",
            &[
                "router",
                "--data-dir",
                data.to_str().unwrap(),
                "--max-attempts",
                "2",
                "--mode",
                mode_arg(mode),
            ],
            every,
        );
        deployment.processes.insert("router", router);
        for name in HANDLERS {
            deployment.start_handler(name, &[]);
        }
        let data = dir.join("coordinator");
        let router = deployment.address("router");
        let inventory = deployment.address("inventory");
        let coordinator = Process::start(
            "coordinator",
            &[
                "coordinator",
                "--data-dir",
                data.to_str().unwrap(),
                "--router",
                &router,
                "--inventory",
                &inventory,
                "--mode",
                mode_arg(mode),
            ],
            &[every, coordinator_env].concat(),
        );
        deployment.processes.insert("coordinator", coordinator);
        deployment
    }

    fn address(&self, name: &str) -> String {
        self.processes[name].address.to_string()
    }

    fn start_handler(&mut self, name: &'static str, env: &[(&str, &str)]) {
        let data = self.dir.join(name);
        let router = self.address("router");
        let process = Process::start(
            name,
            &[
                "handler",
                name,
                "--data-dir",
                data.to_str().unwrap(),
                "--router",
                &router,
                "--mode",
                mode_arg(self.mode),
            ],
            &[&self.every[..], env].concat(),
        );
        self.processes.insert(name, process);
    }

    fn clients(&self, name: &str) -> Clients {
        Clients::new(self.processes[name].address)
    }
}

async fn separate_processes_run_the_saga_and_recover_a_dead_letter(mode: SagaMode) {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Deployment::start(dir.path(), mode);
    let front = mesh.clients("coordinator");
    let wallets = mesh.clients("wallets");
    let inventory = mesh.clients("inventory");
    wait_serving(&front).await;
    wallets.create_user("kim", 1_000).await;
    inventory.create_item("lance", 100, 3).await;

    let ok = front.purchase("kim", "lance", 2).await;
    let (_, done) = front.follow(&ok).await;
    assert_eq!(done.status(), TransactionStatus::Completed);
    let sold_out = front.purchase("kim", "lance", 2).await;
    let (_, failed) = front.follow(&sold_out).await;
    assert_eq!(failed.status(), TransactionStatus::Failed);
    assert!(
        failed.failure_reason.contains("out of stock"),
        "{}",
        failed.failure_reason
    );
    assert_eq!(wallets.balance("kim").await, 800);
    assert_eq!(inventory.stock("lance").await, 1);
    assert_eq!(inventory.held("kim", "lance").await, 2);

    // The purchase log breaks: its event is dead-lettered and the saga waits.
    mesh.processes.get_mut("purchase-log").unwrap().kill();
    mesh.start_handler("purchase-log", &[("SAGAMESH_FAULTS", "log_record=error")]);
    let stuck = front.purchase("kim", "lance", 1).await;
    let router = mesh.clients("router");
    let letter = eventually("a dead letter for the purchase log", || {
        let mut router = router.router.clone();
        async move {
            router
                .list_dead_letters(ListDeadLettersRequest {
                    group: "purchase-log".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .dead_letters
                .into_iter()
                .next()
        }
    })
    .await;
    assert_eq!(letter.envelope.as_ref().unwrap().transaction_id, stuck);
    assert!(
        letter.last_error.contains("injected error"),
        "{}",
        letter.last_error
    );
    let waiting = eventually("the saga to say it waits on the dead letter", || {
        let front = front.clone();
        let stuck = stuck.clone();
        async move { front.transaction(&stuck).await.waiting_on_dead_letter }
    })
    .await;
    assert_eq!(waiting.dead_letter_id, letter.id);
    assert_eq!(waiting.group, "purchase-log");
    assert!(
        waiting.last_error.contains("injected error"),
        "{}",
        waiting.last_error
    );
    assert_eq!(
        front.transaction(&stuck).await.status(),
        TransactionStatus::InProgress
    );
    let stats = front.stats().await;
    assert_eq!(stats.dead_letters, 1);

    // Fixed and replayed, the saga completes.
    mesh.processes.get_mut("purchase-log").unwrap().kill();
    mesh.start_handler("purchase-log", &[]);
    router
        .router
        .clone()
        .replay_dead_letter(ReplayDeadLetterRequest { id: letter.id })
        .await
        .unwrap();
    let (_, recovered) = front.follow(&stuck).await;
    assert_eq!(recovered.status(), TransactionStatus::Completed);
    assert_eq!(recovered.waiting_on_dead_letter, None, "the saga moved on");
    assert_eq!(inventory.held("kim", "lance").await, 3);
}

/// On NATS the router keeps nothing itself: SIGKILLed with sagas in flight
/// and restarted on an empty directory, it resumes from JetStream, every
/// saga completes, and it never wrote a file.
#[tokio::test]
async fn a_router_on_nats_restarts_from_an_empty_directory_and_loses_no_saga() {
    crate::support::distributed(
        "a_router_on_nats_restarts_from_an_empty_directory_and_loses_no_saga",
        async {
            let dir = tempfile::tempdir().unwrap();
            let mut mesh = Deployment::start(dir.path(), SagaMode::Choreography);
            let front = mesh.clients("coordinator");
            wait_serving(&front).await;
            mesh.clients("wallets").create_user("kim", 100_000).await;
            mesh.clients("inventory").create_item("arrow", 1, 10_000).await;
            // With the notifier down, every saga waits in the router for it.
            mesh.processes.get_mut("notifications").unwrap().kill();
            let mut started = Vec::new();
            for _ in 0..60 {
                started.push(front.purchase("kim", "arrow", 1).await);
            }
            let last = started.last().unwrap().clone();
            eventually("the last saga to wait for its notification", || {
                let (front, last) = (front.clone(), last.clone());
                async move {
                    let history = front.transaction(&last).await.history;
                    history
                        .iter()
                        .any(|h| h.event() == EventType::LogRecorded)
                        .then_some(())
                }
            })
            .await;
            let address = mesh.address("router");
            mesh.processes.get_mut("router").unwrap().kill();
            let fresh = dir.path().join("router-after-restart");
            let fresh_arg = fresh.to_str().unwrap().to_owned();
            let router = eventually("the router to restart on its address", || {
                let (address, fresh_arg) = (address.clone(), fresh_arg.clone());
                async move {
                    let args = ["router", "--data-dir", &fresh_arg, "--max-attempts", "2"];
                    Process::try_start("router", &args, &[], &address, None).ok()
                }
            })
            .await;
            mesh.processes.insert("router", router);
            mesh.start_handler("notifications", &[]);
            for id in &started {
                let (_, done) = front.follow(id).await;
                assert_eq!(done.status(), TransactionStatus::Completed, "{done:?}");
            }
            assert_eq!(mesh.clients("wallets").balance("kim").await, 100_000 - 60);
            assert_eq!(mesh.clients("inventory").held("kim", "arrow").await, 60);
            let written: Vec<_> = std::fs::read_dir(&fresh)
                .map(|entries| entries.filter_map(Result::ok).map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(written.is_empty(), "the router wrote {written:?}");
        },
    )
    .await;
}

/// Runs `sagamesh handler wallets` against `router`, set up by `configure`,
/// expecting the router to refuse it: returns what it printed on stderr
/// once it has exited with a failure.
fn refused_wallets(router: &str, data: &Path, configure: impl FnOnce(&mut std::process::Command)) -> String {
    let mut command = std::process::Command::new(crate::support::binary());
    command
        .args([
            "handler",
            "wallets",
            "--listen",
            "127.0.0.1:0",
            "--router",
            router,
        ])
        .args(["--data-dir", data.to_str().unwrap()])
        .env("NO_COLOR", "1");
    configure(&mut command);
    let output = command.output().expect("run sagamesh");
    assert!(!output.status.success(), "the router did not refuse the handler");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A handler whose mode is not the mesh's is refused by the router and
/// stops with the router's reason; the mesh's sagas never reach it.
async fn a_handler_in_the_wrong_mode_is_refused_and_exits(mode: SagaMode) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("router");
    let router_args = [
        "router",
        "--data-dir",
        data.to_str().unwrap(),
        "--mode",
        mode_arg(mode),
    ];
    let router = Process::start("router", &router_args, &[]);
    let other = match mode {
        SagaMode::Orchestration => SagaMode::Choreography,
        _ => SagaMode::Orchestration,
    };
    let stderr = refused_wallets(
        &router.address.to_string(),
        &dir.path().join("wallets"),
        |command| {
            command.env("SAGA_PATTERN_MODE", mode_arg(other));
        },
    );
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(
        stderr.contains(&format!("this mesh runs in {} mode", mode_arg(mode))),
        "the message names both modes: {stderr}"
    );

    let unknown = std::process::Command::new(crate::support::binary())
        .args(["up", "--listen", "127.0.0.1:0"])
        .env("SAGA_PATTERN_MODE", "sideways")
        .output()
        .expect("run sagamesh");
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("sideways"));
}

/// With `--router-token`, the router serves only callers that carry the
/// token: services started with it run sagas across processes, while a
/// service or a raw call without it is refused and told why.
#[tokio::test]
async fn a_router_with_a_token_serves_only_callers_that_carry_it() {
    const TOKEN: &str = "s3cret-token";
    let dir = tempfile::tempdir().unwrap();
    let mesh = Deployment::start_each(
        dir.path(),
        SagaMode::Choreography,
        &[("SAGAMESH_ROUTER_TOKEN", TOKEN)],
        &[],
    );
    let front = mesh.clients("coordinator");
    wait_serving(&front).await;
    mesh.clients("wallets").create_user("kim", 1_000).await;
    mesh.clients("inventory").create_item("lance", 100, 3).await;
    let bought = front.purchase("kim", "lance", 1).await;
    let (_, done) = front.follow(&bought).await;
    assert_eq!(done.status(), TransactionStatus::Completed);

    // A raw call: refused without the token or with another, served with it.
    let router = mesh.clients("router").router;
    for authorization in [None, Some("Bearer not-the-token")] {
        let mut request = tonic::Request::new(ListDeadLettersRequest::default());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        let status = router.clone().list_dead_letters(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{authorization:?}");
        assert!(status.message().contains("token"), "{}", status.message());
    }
    let mut request = tonic::Request::new(ListDeadLettersRequest::default());
    let bearer = format!("Bearer {TOKEN}");
    request
        .metadata_mut()
        .insert("authorization", bearer.parse().unwrap());
    router
        .clone()
        .list_dead_letters(request)
        .await
        .expect("served with the token");

    // A service without the token stops with the router's reason.
    let stderr = refused_wallets(&mesh.address("router"), &dir.path().join("stray"), |command| {
        command.env_remove("SAGAMESH_ROUTER_TOKEN");
    });
    assert!(stderr.contains("token"), "{stderr}");
}

/// One data directory serves one process: a second mesh started on it
/// while the first runs exits once its stores' busy timeout has passed,
/// and says why, and the first goes on.
#[tokio::test]
async fn a_second_mesh_on_a_data_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["up", "--data-dir", data.to_str().unwrap(), "--no-demo-data"];
    let mesh = Process::start("mesh", &args, &[]);
    let clients = Clients::new(mesh.address);
    wait_serving(&clients).await;

    let log = dir.path().join("second.log");
    let child = std::process::Command::new(crate::support::binary())
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("SAGAMESH_BUS")
        .env_remove("SAGAMESH_DATABASE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run sagamesh");
    let mut second = KilledOnDrop(child);
    let exited = eventually("the second mesh to exit", || {
        let status = second.0.try_wait().expect("try_wait");
        async move { status }
    })
    .await;
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!exited.success(), "{stderr}");
    assert!(stderr.contains("another process has it open"), "{stderr}");

    clients.create_user("alice", 100).await;
    assert_eq!(clients.balance("alice").await, 100);
}

/// A child process that is killed if the test ends before it exits.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn a_killed_mesh_finishes_every_saga_after_restart_and_conserves_money_and_stock(mode: SagaMode) {
    killed_and_restarted(mode, mode).await;
}

/// A saga started in one mode finishes in that mode after the mesh
/// restarts in the other.
async fn choreography_sagas_finish_as_such_after_a_restart_in_orchestration() {
    killed_and_restarted(SagaMode::Choreography, SagaMode::Orchestration).await;
}

async fn orchestration_sagas_finish_as_such_after_a_restart_in_choreography() {
    killed_and_restarted(SagaMode::Orchestration, SagaMode::Choreography).await;
}

/// Loads a mesh in `before`, SIGKILLs it with sagas in flight, restarts it
/// in `after` and checks every saga's end and the conservation of money and
/// stock.
async fn killed_and_restarted(before: SagaMode, after: SagaMode) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let args = |mode| {
        [
            "up",
            "--data-dir",
            data.as_str(),
            "--no-demo-data",
            "--mode",
            mode_arg(mode),
        ]
    };
    let mut mesh = Process::start("mesh", &args(before), &[]);
    let clients = Clients::new(mesh.address);
    wait_serving(&clients).await;
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    for user in &users {
        clients.create_user(user, 1_000).await;
    }
    clients.create_item("potion", 7, 100).await;

    // Purchases from every user at once, some of which fail (the last ones
    // run out of stock); SIGKILL while they are still coming in.
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut buyers = Vec::new();
    for (index, user) in users.iter().enumerate() {
        let (clients, user, accepted) = (clients.clone(), user.clone(), accepted.clone());
        buyers.push(tokio::spawn(async move {
            for round in 0..40 {
                let request = PurchaseRequest {
                    user_id: user.clone(),
                    item_id: "potion".into(),
                    quantity: 1 + ((round + index as u32) % 2),
                    idempotency_key: String::new(),
                };
                if clients.coordinator.clone().purchase(request).await.is_err() {
                    return;
                }
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    eventually("a third of the purchases to be accepted", || {
        let accepted = accepted.load(Ordering::Relaxed);
        async move { (accepted >= 100).then_some(()) }
    })
    .await;
    mesh.kill();
    for buyer in buyers {
        let _ = buyer.await;
    }

    let mesh = Process::start("mesh", &args(after), &[]);
    let clients = Clients::new(mesh.address);
    wait_serving(&clients).await;
    let all = every_transaction(&clients).await;
    assert!(
        all.iter().all(|t| t.mode() == before),
        "every saga keeps the mode it started in"
    );
    assert!(
        all.len() >= 100,
        "every accepted purchase is recorded: {}",
        all.len()
    );
    let unfinished = all
        .iter()
        .filter(|t| !sagamesh_coordinator::is_terminal(t.status()))
        .count();
    eprintln!(
        "restart: {} sagas recorded, {unfinished} unfinished at restart",
        all.len()
    );
    let mut spent = 0;
    let mut granted = 0;
    for transaction in &all {
        let (_, done) = clients.follow(&transaction.transaction_id).await;
        match done.status() {
            TransactionStatus::Completed => {
                spent += done.total_price;
                granted += u64::from(done.quantity);
            }
            TransactionStatus::Failed => {}
            other => panic!("saga {} ended {other:?}: {done:?}", done.transaction_id),
        }
        assert_eq!(done.mode(), before);
        let commanded = done
            .history
            .iter()
            .any(|h| h.event() == EventType::ExecuteUserValidation);
        assert_eq!(
            commanded,
            before == SagaMode::Orchestration,
            "saga {} ran its steps in {before:?} mode: {:?}",
            done.transaction_id,
            done.history
        );
    }
    // A new saga runs in the mode of the restarted mesh.
    let fresh = clients.purchase("user-0", "potion", 1).await;
    let (_, fresh) = clients.follow(&fresh).await;
    assert_eq!(fresh.mode(), after);
    let mut balances = 0;
    let mut held = 0;
    for user in &users {
        balances += clients.balance(user).await;
        held += clients.held(user, "potion").await;
    }
    assert_eq!(balances + spent, 8 * 1_000, "money is conserved");
    assert_eq!(
        held, granted,
        "every granted item belongs to a completed purchase"
    );
    assert_eq!(clients.stock("potion").await + held, 100, "stock is conserved");
    assert!(granted > 0);
}

/// Every transaction the coordinator has, through its pages.
async fn every_transaction(clients: &Clients) -> Vec<sagamesh_proto::v1::Transaction> {
    let mut all = Vec::new();
    let mut request = ListTransactionsRequest {
        page_size: 100,
        ..Default::default()
    };
    loop {
        let page = clients
            .coordinator
            .clone()
            .list_transactions(request.clone())
            .await
            .unwrap()
            .into_inner();
        all.extend(page.transactions);
        if page.next_page_token.is_empty() {
            return all;
        }
        request.page_token = page.next_page_token;
    }
}

/// SIGTERM: the mesh stops taking work, finishes or hands back what it
/// holds, flushes its outboxes and exits 0; after a restart every saga ends
/// and nothing is lost or doubled.
async fn sigterm_drains_and_exits_cleanly(mode: SagaMode) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let args = [
        "up",
        "--data-dir",
        data.as_str(),
        "--no-demo-data",
        "--mode",
        mode_arg(mode),
    ];
    let counts: MarkerCounts = Arc::new(Default::default());
    let mut mesh = Process::try_start("mesh", &args, &[], "127.0.0.1:0", Some(counts.clone())).unwrap();
    let clients = Clients::new(mesh.address);
    wait_serving(&clients).await;
    clients.create_user("olga", 100_000).await;
    clients.create_item("lamp", 3, 10_000).await;
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut buyers = Vec::new();
    for _ in 0..8 {
        let (clients, accepted) = (clients.clone(), accepted.clone());
        buyers.push(tokio::spawn(async move {
            for _ in 0..50 {
                let request = PurchaseRequest {
                    user_id: "olga".into(),
                    item_id: "lamp".into(),
                    quantity: 1,
                    idempotency_key: String::new(),
                };
                match clients.coordinator.clone().purchase(request).await {
                    Ok(response) => accepted.lock().await.push(response.into_inner().transaction_id),
                    Err(_) => return,
                }
            }
        }));
    }
    eventually("purchases to be under way", || {
        let accepted = accepted.clone();
        async move { (accepted.lock().await.len() >= 100).then_some(()) }
    })
    .await;
    mesh.terminate();
    let status = mesh.wait_exit().await;
    assert!(status.success(), "a graceful stop exits 0, not {status:?}");
    assert!(
        counts[3].load(Ordering::Relaxed) >= 1,
        "the handlers report that they drained"
    );
    for buyer in buyers {
        let _ = buyer.await;
    }

    let mesh = Process::start("mesh", &args, &[]);
    let clients = Clients::new(mesh.address);
    wait_serving(&clients).await;
    let accepted = accepted.lock().await.clone();
    let all = every_transaction(&clients).await;
    assert!(
        accepted
            .iter()
            .all(|id| all.iter().any(|t| &t.transaction_id == id)),
        "every accepted purchase is recorded"
    );
    for transaction in &all {
        let (_, done) = clients.follow(&transaction.transaction_id).await;
        assert_eq!(done.status(), TransactionStatus::Completed, "{done:?}");
    }
    let total = all.len() as u64;
    assert_eq!(clients.balance("olga").await, 100_000 - 3 * total);
    assert_eq!(clients.held("olga", "lamp").await, total);
}

/// A saga whose step's service is down for good is failed after its
/// deadline: the money and the items come back at once, the late step is
/// undone when its service returns, and the steps after it never run.
async fn a_stalled_saga_is_failed_and_compensated_after_its_deadline(mode: SagaMode) {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Deployment::start_with(dir.path(), mode, &[("SAGAMESH_SAGA_DEADLINE_MS", "800")]);
    let front = mesh.clients("coordinator");
    let wallets = mesh.clients("wallets");
    let inventory = mesh.clients("inventory");
    let notifications = mesh.clients("notifications");
    wait_serving(&front).await;
    wallets.create_user("pia", 1_000).await;
    inventory.create_item("harp", 250, 4).await;

    mesh.processes.get_mut("purchase-log").unwrap().kill();
    let id = front.purchase("pia", "harp", 2).await;
    let compensating = eventually("the saga to time out", || {
        let front = front.clone();
        let id = id.clone();
        async move {
            let t = front.transaction(&id).await;
            (t.status() == TransactionStatus::Compensating).then_some(t)
        }
    })
    .await;
    assert!(
        compensating.failure_reason.contains("deadline exceeded"),
        "{}",
        compensating.failure_reason
    );
    assert!(
        compensating.failure_reason.contains("log_record"),
        "{}",
        compensating.failure_reason
    );
    // The refund and the items do not wait for the service that is down.
    eventually("the money and the items to come back", || {
        let (wallets, inventory) = (wallets.clone(), inventory.clone());
        async move {
            let back = wallets.balance("pia").await == 1_000
                && inventory.held("pia", "harp").await == 0
                && inventory.stock("harp").await == 4;
            back.then_some(())
        }
    })
    .await;

    // The service comes back: its late step runs and is undone; nothing
    // after it runs.
    mesh.start_handler("purchase-log", &[]);
    let (_, done) = front.follow(&id).await;
    assert_eq!(done.status(), TransactionStatus::Failed, "{done:?}");
    assert!(
        done.failure_reason.contains("deadline exceeded"),
        "{}",
        done.failure_reason
    );
    let log = mesh
        .clients("purchase-log")
        .logs
        .clone()
        .get_log(GetLogRequest {
            transaction_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(log.status(), LogStatus::LogFailedByCompensation);
    let sent = notifications
        .notifications
        .clone()
        .list_notifications(ListNotificationsRequest {
            user_id: "pia".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .notifications;
    assert!(
        sent.iter()
            .all(|n| n.kind() != NotificationKind::PurchaseConfirmation),
        "no confirmation after the saga timed out: {sent:?}"
    );
    assert_eq!(wallets.balance("pia").await, 1_000);
    assert_eq!(inventory.stock("harp").await, 4);
}

in_both_modes!(
    separate_processes_run_the_saga_and_recover_a_dead_letter,
    a_handler_in_the_wrong_mode_is_refused_and_exits,
    a_killed_mesh_finishes_every_saga_after_restart_and_conserves_money_and_stock,
    sigterm_drains_and_exits_cleanly,
    a_stalled_saga_is_failed_and_compensated_after_its_deadline,
);

on_both_backends!(
    choreography_sagas_finish_as_such_after_a_restart_in_orchestration,
    orchestration_sagas_finish_as_such_after_a_restart_in_choreography,
);
