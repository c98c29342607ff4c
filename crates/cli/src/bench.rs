//! `sagamesh bench`: runs purchases against a running mesh in a closed loop
//! and reports throughput, end-to-end latency (from `Purchase` until the
//! terminal state is seen on `StreamTransaction`), and the per-stage table of
//! the seed system with our figures beside its own.
//!
//! It creates its own users and item (named after the run) through the
//! public services, so it can run against any mesh, demo data or not.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use sagamesh_proto::v1::inventory_client::InventoryClient;
use sagamesh_proto::v1::purchase_coordinator_client::PurchaseCoordinatorClient;
use sagamesh_proto::v1::wallets_client::WalletsClient;
use sagamesh_proto::v1::{
    CreateItemRequest, CreateUserRequest, EventType, GetStatsRequest, ListTransactionsRequest,
    PurchaseRequest, TransactionStatus,
};
use tokio::sync::Mutex;

use crate::cli::Mode;
use crate::machine::Floor;
use crate::watch::{self, TransactionSeen};
use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint};

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Starts a mesh in this process in that mode (or each mode in turn,
    /// printed side by side) instead of using `--target`.
    #[arg(long)]
    mode: Option<BenchMode>,
    /// The mesh's public address.
    #[arg(long, env = "SAGAMESH_TARGET", default_value = "127.0.0.1:50051")]
    target: String,
    /// Where the bench creates its users, when the wallets service runs on
    /// its own address (one service per process); by default `--target`.
    #[arg(long)]
    wallets: Option<String>,
    /// Where the bench creates its items, when the inventory service runs
    /// on its own address; by default `--target`.
    #[arg(long)]
    inventory: Option<String>,
    /// Purchases to run (after the warmup).
    #[arg(long, default_value_t = 2_000)]
    count: usize,
    /// Runs for this many seconds instead of `--count` purchases.
    #[arg(long)]
    duration: Option<u64>,
    /// Runs once per concurrency (e.g. `1,4,16,64,256`) and writes the
    /// curve to `<out>.json` and `<out>.svg`.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Where a sweep writes its JSON and SVG (without extension).
    #[arg(long, default_value = "bench-sweep")]
    out: String,
    /// Purchases in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Purchases run first and not measured.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[arg(long, default_value = "success")]
    scenario: Scenario,
    /// Prints the summary as JSON.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    /// Whether the bench only drives a mesh in another process.
    pub fn drives_a_remote_mesh(&self) -> bool {
        self.mode.is_none()
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BenchMode {
    Choreography,
    Orchestration,
    /// Choreography, then orchestration, and a side-by-side summary.
    Both,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Scenario {
    /// Every purchase completes.
    Success,
    /// Every purchase fails at the item grant (out of stock) and its payment
    /// is compensated.
    Failure,
    /// Every fourth purchase fails.
    Mixed,
}

/// The seed system's stages and average times (ms), from its documentation.
const SEED_STAGES: [(&str, EventType, EventType, f64); 4] = [
    (
        "PurchaseInitiated → UserValidated",
        EventType::PurchaseInitiated,
        EventType::UserValidated,
        10.0,
    ),
    (
        "UserValidated → ItemGranted",
        EventType::UserValidated,
        EventType::ItemGranted,
        8.0,
    ),
    (
        "ItemGranted → LogRecorded",
        EventType::ItemGranted,
        EventType::LogRecorded,
        15.0,
    ),
    (
        "LogRecorded → PurchaseCompleted",
        EventType::LogRecorded,
        EventType::PurchaseCompleted,
        5.0,
    ),
];

#[derive(Default)]
struct Results {
    end_to_end: Option<Histogram<u64>>,
    purchase_rpc: Option<Histogram<u64>>,
    stages: Vec<Option<Histogram<u64>>>,
    errors: BTreeMap<String, u64>,
    outcomes: BTreeMap<&'static str, u64>,
    /// CPU time of this whole process while measuring: with a mesh of its
    /// own, the mesh and the load generator together.
    cpu: Option<Duration>,
    /// `GetStats` and the first page of `ListTransactions`, timed after
    /// the run with everything it stored.
    reads: Option<Reads>,
    /// This machine's fsync and wake-up latency, just before the run.
    floor: Option<Floor>,
}

/// Latency of the read RPCs, one call at a time.
struct Reads {
    get_stats: Histogram<u64>,
    list_first_page: Histogram<u64>,
}

impl Reads {
    /// `GetStats` p50 and p99, then `ListTransactions`', in milliseconds.
    fn quantiles_ms(&self) -> [f64; 4] {
        [
            ms(self.get_stats.value_at_quantile(0.5)),
            ms(self.get_stats.value_at_quantile(0.99)),
            ms(self.list_first_page.value_at_quantile(0.5)),
            ms(self.list_first_page.value_at_quantile(0.99)),
        ]
    }
}

/// Calls of each read RPC timed after a run.
const READ_CALLS: usize = 200;

/// Times `GetStats` and the first page of `ListTransactions` (50
/// transactions, newest first), one call at a time, after one untimed call
/// of each.
async fn time_reads(channel: &Channel) -> Result<Reads, tonic::Status> {
    let mut client = PurchaseCoordinatorClient::new(channel.clone());
    let mut reads = Reads {
        get_stats: histogram(),
        list_first_page: histogram(),
    };
    let first_page = || ListTransactionsRequest {
        page_size: 50,
        ..Default::default()
    };
    client.get_stats(GetStatsRequest {}).await?;
    client.list_transactions(first_page()).await?;
    for _ in 0..READ_CALLS {
        let started = Instant::now();
        client.get_stats(GetStatsRequest {}).await?;
        reads.get_stats.saturating_record(micros(started.elapsed()));
        let started = Instant::now();
        client.list_transactions(first_page()).await?;
        reads.list_first_page.saturating_record(micros(started.elapsed()));
    }
    Ok(reads)
}

/// The CPU time this process has used, from `/proc/self/stat` (Linux).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let (user, system): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // /proc reports in USER_HZ, which Linux fixes at 100 per second.
    Some(Duration::from_millis((user + system) * 10))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds from 1 µs to an hour are valid")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    if args.concurrency == 0 || args.count == 0 || args.sweep.contains(&0) {
        return Err("--count, --concurrency and every --sweep value must be at least 1".into());
    }
    if !args.sweep.is_empty() {
        return sweep(&args).await;
    }
    let modes = match args.mode {
        None => {
            let target = args.target.clone();
            let (results, elapsed) = bench_target(&args, &target).await?;
            report(&args, &results, elapsed, None);
            return Ok(());
        }
        Some(BenchMode::Choreography) => vec![Mode::Choreography],
        Some(BenchMode::Orchestration) => vec![Mode::Orchestration],
        Some(BenchMode::Both) => vec![Mode::Choreography, Mode::Orchestration],
    };
    let mut lines = Vec::new();
    for mode in modes {
        let (results, elapsed) = bench_own_mesh(&args, mode).await?;
        lines.push(report(&args, &results, elapsed, Some(mode)));
    }
    if lines.len() > 1 && !args.json {
        println!("side by side (concurrency {}):", args.concurrency);
        println!("  mode           purchases/s   e2e p50    e2e p99");
        for line in lines {
            println!("  {line}");
        }
    }
    Ok(())
}

/// One point of a sweep.
struct Point {
    mode: &'static str,
    concurrency: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs the bench once per concurrency (and mode) and writes the curve.
async fn sweep(args: &BenchArgs) -> Result<(), String> {
    let modes: Vec<Option<Mode>> = match args.mode {
        None => vec![None],
        Some(BenchMode::Choreography) => vec![Some(Mode::Choreography)],
        Some(BenchMode::Orchestration) => vec![Some(Mode::Orchestration)],
        Some(BenchMode::Both) => vec![Some(Mode::Choreography), Some(Mode::Orchestration)],
    };
    let mut points = Vec::new();
    for mode in modes {
        for &concurrency in &args.sweep {
            let mut point_args = args.clone();
            point_args.concurrency = concurrency;
            let (results, elapsed) = match mode {
                Some(mode) => bench_own_mesh(&point_args, mode).await?,
                None => bench_target(&point_args, &args.target).await?,
            };
            report(&point_args, &results, elapsed, mode);
            let e2e = results
                .end_to_end
                .as_ref()
                .expect("measured runs have histograms");
            points.push(Point {
                mode: mode.map_or("target", |m| m.saga_mode().name()),
                concurrency,
                rate: e2e.len() as f64 / elapsed.as_secs_f64(),
                p50_ms: ms(e2e.value_at_quantile(0.5)),
                p99_ms: ms(e2e.value_at_quantile(0.99)),
            });
        }
    }
    let json: Vec<String> = points
        .iter()
        .map(|p| {
            format!(
                "{{\"mode\":\"{}\",\"concurrency\":{},\"purchases_per_second\":{:.1},\"e2e_p50_ms\":{:.3},\"e2e_p99_ms\":{:.3}}}",
                p.mode, p.concurrency, p.rate, p.p50_ms, p.p99_ms
            )
        })
        .collect();
    let json_path = format!("{}.json", args.out);
    std::fs::write(&json_path, format!("[\n  {}\n]\n", json.join(",\n  ")))
        .map_err(|e| format!("cannot write {json_path}: {e}"))?;
    let svg_path = format!("{}.svg", args.out);
    chart(&points, &svg_path).map_err(|e| format!("cannot draw {svg_path}: {e}"))?;
    println!("sweep written to {json_path} and {svg_path}");
    Ok(())
}

/// Throughput against concurrency, one line per mode.
fn chart(points: &[Point], path: &str) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;

    let max_rate = points.iter().map(|p| p.rate).fold(1.0, f64::max) * 1.15;
    let max_concurrency = points.iter().map(|p| p.concurrency).max().unwrap_or(1) as f64;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "sagamesh: completed purchases/s by concurrency (durable)",
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..max_concurrency * 1.5).log_scale(), 0f64..max_rate)?;
    chart
        .configure_mesh()
        .x_desc("concurrency (purchases in flight)")
        .y_desc("purchases/s")
        .draw()?;
    let mut modes: Vec<&str> = points.iter().map(|p| p.mode).collect();
    modes.dedup();
    for (index, mode) in modes.into_iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let series: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.mode == mode)
            .map(|p| (p.concurrency as f64, p.rate))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(mode)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(series.into_iter().map(|xy| Circle::new(xy, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Starts a mesh in this process (durable defaults, a fresh data directory,
/// an ephemeral port), benches it, and stops it.
async fn bench_own_mesh(args: &BenchArgs, mode: Mode) -> Result<(Results, Duration), String> {
    let dir = std::env::temp_dir().join(format!("sagamesh-bench-{}", run_suffix()));
    let mut config = sagamesh_mesh::MeshConfig::new(dir.clone());
    config.mode = mode.saga_mode();
    config.demo_data = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen for the bench mesh: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mesh = tokio::spawn(sagamesh_mesh::run(
        sagamesh_mesh::Role::All,
        config,
        listener,
        shutdown.clone(),
    ));
    let outcome = bench_target(args, &address.to_string()).await;
    shutdown.cancel();
    let _ = mesh.await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// A channel to `address`, retried for a while: the mesh may still be
/// starting (an own mesh).
async fn connect(address: &str) -> Result<Channel, String> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| format!("bad address {address}: {e}"))?
        .tcp_nodelay(true);
    let mut attempts = 0;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if attempts >= 50 => return Err(format!("cannot reach the mesh at {address}: {e}")),
            Err(_) => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Creates the bench's users and items on the mesh at `target`, warms up,
/// and measures `--count` purchases.
async fn bench_target(args: &BenchArgs, target: &str) -> Result<(Results, Duration), String> {
    let channel = connect(target).await?;
    let wallets_channel = match &args.wallets {
        Some(address) => connect(address).await?,
        None => channel.clone(),
    };
    let inventory_channel = match &args.inventory {
        Some(address) => connect(address).await?,
        None => channel.clone(),
    };

    let run_id = run_suffix();
    let users = args.concurrency;
    // Enough money and stock for any run, timed or counted, at price 1.
    let budget: u64 = 1 << 40;
    let item_ok = format!("bench-{run_id}-item");
    let item_empty = format!("bench-{run_id}-sold-out");
    let mut wallets = WalletsClient::new(wallets_channel);
    for i in 0..users {
        wallets
            .create_user(CreateUserRequest {
                user_id: format!("bench-{run_id}-user-{i}"),
                balance: budget,
            })
            .await
            .map_err(|e| format!("cannot create bench users: {}", e.message()))?;
    }
    let mut inventory = InventoryClient::new(inventory_channel);
    for (item_id, stock) in [(&item_ok, budget), (&item_empty, 0)] {
        inventory
            .create_item(CreateItemRequest {
                item_id: item_id.clone(),
                name: "Bench item".into(),
                price: 1,
                stock,
            })
            .await
            .map_err(|e| format!("cannot create the bench items: {}", e.message()))?;
    }

    if args.warmup > 0 {
        drive(&channel, args, &run_id, &item_ok, &item_empty, args.warmup, None).await;
    }
    let results = Arc::new(Mutex::new(Results {
        end_to_end: Some(histogram()),
        purchase_rpc: Some(histogram()),
        stages: SEED_STAGES.iter().map(|_| Some(histogram())).collect(),
        ..Default::default()
    }));
    // In the temp directory: where a bench's own mesh keeps its data; with
    // `--target`, this machine's, which may not be the mesh's.
    let floor = tokio::task::spawn_blocking(|| Floor::measure(&std::env::temp_dir()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|measured| measured.map_err(|e| e.to_string()))
        .inspect_err(|e| eprintln!("sagamesh bench: cannot time this machine's fsync and wake-ups: {e}"))
        .ok();
    let cpu_before = process_cpu();
    let started = Instant::now();
    let count = if args.duration.is_some() {
        usize::MAX
    } else {
        args.count
    };
    drive(
        &channel,
        args,
        &run_id,
        &item_ok,
        &item_empty,
        count,
        Some(results.clone()),
    )
    .await;
    let elapsed = started.elapsed();
    let mut results = std::mem::take(&mut *results.lock().await);
    results.cpu = cpu_before
        .zip(process_cpu())
        .map(|(before, after)| after.saturating_sub(before));
    results.floor = floor;
    // A failed read RPC costs the run its read figures, not the rest.
    results.reads = time_reads(&channel)
        .await
        .inspect_err(|e| eprintln!("sagamesh bench: cannot time the read RPCs: {}", e.message()))
        .ok();
    Ok((results, elapsed))
}

/// A short suffix that tells this run's users and items from earlier runs'.
fn run_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:x}", nanos & 0xffff_ffff_ffff)
}

async fn drive(
    channel: &Channel,
    args: &BenchArgs,
    run_id: &str,
    item_ok: &str,
    item_empty: &str,
    count: usize,
    results: Option<Arc<Mutex<Results>>>,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let until = args
        .duration
        .map(|secs| Instant::now() + Duration::from_secs(secs));
    // A progress bar on a terminal for the measured part (hidden otherwise).
    let progress = match (&results, until) {
        (None, _) => indicatif::ProgressBar::hidden(),
        (Some(_), Some(_)) => indicatif::ProgressBar::new_spinner(),
        (Some(_), None) => indicatif::ProgressBar::new(count as u64),
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} purchases, {per_sec} ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let progress = progress.clone();
        let client = PurchaseCoordinatorClient::new(channel.clone());
        let grpc = Grpc::new(channel.clone());
        let next = next.clone();
        let results = results.clone();
        let user_id = format!("bench-{run_id}-user-{worker}");
        let (item_ok, item_empty, scenario) = (item_ok.to_owned(), item_empty.to_owned(), args.scenario);
        workers.push(tokio::spawn(async move {
            let (mut client, mut grpc) = (client, grpc);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count || until.is_some_and(|until| Instant::now() >= until) {
                    return;
                }
                let fails = match scenario {
                    Scenario::Success => false,
                    Scenario::Failure => true,
                    Scenario::Mixed => n % 4 == 3,
                };
                let item_id = if fails {
                    item_empty.clone()
                } else {
                    item_ok.clone()
                };
                let outcome = one_purchase(&mut client, &mut grpc, user_id.clone(), item_id).await;
                if let Some(results) = &results {
                    record(&mut *results.lock().await, outcome);
                    progress.inc(1);
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    progress.finish_and_clear();
}

struct Measured {
    rpc: Duration,
    end_to_end: Duration,
    transaction: TransactionSeen,
}

async fn one_purchase(
    client: &mut PurchaseCoordinatorClient<Channel>,
    grpc: &mut Grpc<Channel>,
    user_id: String,
    item_id: String,
) -> Result<Measured, tonic::Status> {
    let started = Instant::now();
    let response = client
        .purchase(PurchaseRequest {
            user_id,
            item_id,
            quantity: 1,
            idempotency_key: String::new(),
        })
        .await?
        .into_inner();
    let rpc = started.elapsed();
    let mut stream = watch::stream_transaction(grpc, response.transaction_id).await?;
    while let Some(update) = stream.message().await? {
        if let Some(transaction) = update.transaction
            && sagamesh_coordinator::is_terminal(transaction.status())
        {
            let end_to_end = started.elapsed();
            // The server ends the stream after a terminal state; reading to
            // the end spares a stream reset per purchase.
            while stream.message().await?.is_some() {}
            return Ok(Measured {
                rpc,
                end_to_end,
                transaction,
            });
        }
    }
    Err(tonic::Status::data_loss(
        "the stream ended before a terminal state",
    ))
}

fn record(results: &mut Results, outcome: Result<Measured, tonic::Status>) {
    match outcome {
        Err(status) => *results.errors.entry(format!("{:?}", status.code())).or_default() += 1,
        Ok(measured) => {
            let status = match measured.transaction.status() {
                TransactionStatus::Completed => "completed",
                TransactionStatus::Failed => "failed",
                _ => "needs attention",
            };
            *results.outcomes.entry(status).or_default() += 1;
            if let Some(h) = results.end_to_end.as_mut() {
                h.saturating_record(micros(measured.end_to_end));
            }
            if let Some(h) = results.purchase_rpc.as_mut() {
                h.saturating_record(micros(measured.rpc));
            }
            let at = |event: EventType| {
                measured
                    .transaction
                    .history
                    .iter()
                    .find(|h| h.event == event as i32)
                    .and_then(|h| h.occurred_at)
                    .map(|t| sagamesh_proto::system_time(&t))
            };
            for (index, (_, from, to, _)) in SEED_STAGES.iter().enumerate() {
                if let (Some(from), Some(to)) = (at(*from), at(*to))
                    && let (Ok(d), Some(h)) = (to.duration_since(from), results.stages[index].as_mut())
                {
                    h.saturating_record(micros(d));
                }
            }
        }
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Prints the summary; returns the one-line side-by-side form.
fn report(args: &BenchArgs, results: &Results, elapsed: Duration, mode: Option<Mode>) -> String {
    let e2e = results
        .end_to_end
        .as_ref()
        .expect("measured runs have histograms");
    let rpc = results
        .purchase_rpc
        .as_ref()
        .expect("measured runs have histograms");
    let done = e2e.len();
    let rate = done as f64 / elapsed.as_secs_f64();
    let scenario = match args.scenario {
        Scenario::Success => "success",
        Scenario::Failure => "failure",
        Scenario::Mixed => "mixed",
    };
    let mode_name = mode.map_or("of the target mesh", |m| m.saga_mode().name());
    let line = format!(
        "{:<14} {rate:>11.1} {:>8.2} ms {:>7.2} ms",
        mode.map_or("target", |_| mode_name),
        ms(e2e.value_at_quantile(0.5)),
        ms(e2e.value_at_quantile(0.99))
    );
    if args.json {
        let stages: Vec<String> = SEED_STAGES
            .iter()
            .zip(&results.stages)
            .map(|((name, _, _, seed), h)| {
                let mean = h.as_ref().map_or(0.0, |h| h.mean() / 1000.0);
                format!("{{\"stage\":\"{name}\",\"seed_ms\":{seed},\"ours_ms\":{mean:.3}}}")
            })
            .collect();
        let errors: Vec<String> = results
            .errors
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        let reads = results.reads.as_ref().map_or(String::new(), |reads| {
            let [stats_p50, stats_p99, list_p50, list_p99] = reads.quantiles_ms();
            format!(
                ",\"get_stats_ms\":{{\"p50\":{stats_p50:.3},\"p99\":{stats_p99:.3}}},\"list_first_page_ms\":{{\"p50\":{list_p50:.3},\"p99\":{list_p99:.3}}}"
            )
        });
        let floor = results.floor.map_or(String::new(), |floor| {
            format!(
                ",\"machine\":{{\"fdatasync_us\":{:.1},\"wake_up_round_trip_us\":{:.1}}}",
                floor.fdatasync_us, floor.wake_up_round_trip_us
            )
        });
        println!(
            "{{\"mode\":\"{mode_name}\",\"scenario\":\"{scenario}\",\"concurrency\":{},\"purchases\":{done},\"seconds\":{:.3},\"purchases_per_second\":{rate:.1},\"e2e_ms\":{{\"p50\":{:.3},\"p90\":{:.3},\"p99\":{:.3},\"max\":{:.3}}},\"purchase_rpc_ms\":{{\"p50\":{:.3},\"p99\":{:.3}}}{reads}{floor},\"errors\":{{{}}},\"stages\":[{}]}}",
            args.concurrency,
            elapsed.as_secs_f64(),
            ms(e2e.value_at_quantile(0.5)),
            ms(e2e.value_at_quantile(0.9)),
            ms(e2e.value_at_quantile(0.99)),
            ms(e2e.max()),
            ms(rpc.value_at_quantile(0.5)),
            ms(rpc.value_at_quantile(0.99)),
            errors.join(","),
            stages.join(",")
        );
        return line;
    }
    println!(
        "sagamesh bench: mode {mode_name}, scenario {scenario}, concurrency {}, {done} purchases in {:.2}s",
        args.concurrency,
        elapsed.as_secs_f64()
    );
    println!("  throughput       {rate:.1} purchases/s");
    println!(
        "  end to end       p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        ms(e2e.value_at_quantile(0.5)),
        ms(e2e.value_at_quantile(0.9)),
        ms(e2e.value_at_quantile(0.99)),
        ms(e2e.max())
    );
    println!(
        "  Purchase RPC     p50 {:.2} ms   p99 {:.2} ms",
        ms(rpc.value_at_quantile(0.5)),
        ms(rpc.value_at_quantile(0.99))
    );
    if let Some(reads) = &results.reads {
        let [stats_p50, stats_p99, list_p50, list_p99] = reads.quantiles_ms();
        println!(
            "  read RPCs        GetStats p50 {stats_p50:.2} ms p99 {stats_p99:.2} ms; ListTransactions first page p50 {list_p50:.2} ms p99 {list_p99:.2} ms"
        );
    }
    if let (Some(cpu), Some(_)) = (results.cpu, mode) {
        println!(
            "  CPU per purchase {:.3} ms (the mesh and this load generator, one process)",
            cpu.as_secs_f64() * 1000.0 / done.max(1) as f64
        );
    }
    if let Some(floor) = results.floor {
        println!(
            "  this machine     fdatasync p50 {:.0} µs (temp directory); thread wake-up round trip p50 {:.0} µs (just before the run)",
            floor.fdatasync_us, floor.wake_up_round_trip_us
        );
    }
    let outcomes: Vec<String> = results.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("  outcomes         {}", outcomes.join(", "));
    if results.errors.is_empty() {
        println!("  errors           none");
    } else {
        let errors: Vec<String> = results.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  errors           {}", errors.join(", "));
    }
    println!();
    println!("  | stage                              | seed average | sagamesh average | sagamesh p99 |");
    println!("  |------------------------------------|--------------|------------------|--------------|");
    let mut seed_total = 0.0;
    let mut ours_total = 0.0;
    for ((name, _, _, seed), h) in SEED_STAGES.iter().zip(&results.stages) {
        seed_total += seed;
        match h {
            Some(h) if !h.is_empty() => {
                let (mean, p99) = (h.mean() / 1000.0, ms(h.value_at_quantile(0.99)));
                ours_total += mean;
                println!("  | {name:<34} | {seed:>9.1} ms | {mean:>13.3} ms | {p99:>9.3} ms |");
            }
            // The failure scenario never reaches the later stages.
            _ => println!(
                "  | {name:<34} | {seed:>9.1} ms | {:>16} | {:>12} |",
                "not reached", "-"
            ),
        }
    }
    println!(
        "  | {:<34} | {seed_total:>9.1} ms | {ours_total:>13.3} ms |              |",
        "cumulative"
    );
    line
}
