//! `sagamesh bench`: the load generator users reproduce our figures with.
//! Runs it for real on a mesh of its own and checks what it reports.

use std::process::Stdio;

use tokio::process::Command;

use sagamesh_proto::v1::{SagaMode, TransactionStatus};

use crate::support::{DEADLINE, Mesh, binary};

/// Runs `sagamesh bench <args>`; returns its standard output. Fails the
/// test (and kills the bench) if it has not finished within the deadline.
async fn bench(args: &[&str]) -> String {
    let child = Command::new(binary())
        .arg("bench")
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("SAGAMESH_TARGET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the bench starts");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("bench {args:?} did not finish within {DEADLINE:?}"))
        .expect("the bench's output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "bench {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn the_bench_reports_every_purchase_and_the_read_rpcs() {
    let json = bench(&[
        "--mode",
        "choreography",
        "--scenario",
        "mixed",
        "--count",
        "40",
        "--warmup",
        "4",
        "--concurrency",
        "4",
        "--json",
    ])
    .await;
    let line = json.lines().last().unwrap_or_default();
    for expected in [
        "\"scenario\":\"mixed\"",
        "\"concurrency\":4",
        "\"purchases\":40",
        "\"errors\":{}",
        "\"get_stats_ms\":{\"p50\":",
        "\"list_first_page_ms\":{\"p50\":",
        "\"machine\":{\"fdatasync_us\":",
    ] {
        assert!(line.contains(expected), "{expected} missing from {line}");
    }
}

#[tokio::test]
async fn the_bench_drives_a_mesh_it_did_not_start() {
    let mesh = Mesh::start(SagaMode::Choreography).await;
    let target = mesh.clients.address.to_string();
    let report = bench(&[
        "--target",
        &target,
        "--scenario",
        "mixed",
        "--count",
        "24",
        "--warmup",
        "4",
        "--concurrency",
        "3",
    ])
    .await;
    assert!(report.contains("completed 18"), "{report}");
    assert!(report.contains("failed 6"), "{report}");
    assert!(report.contains("errors           none"), "{report}");
    // The warmup's purchases ran on the mesh too, and every one ended.
    let stats = mesh.clients.stats().await;
    let count = |status: TransactionStatus| {
        stats
            .by_status
            .iter()
            .find(|c| c.status == status as i32)
            .map_or(0, |c| c.count)
    };
    assert_eq!(stats.total, 28);
    assert_eq!(
        count(TransactionStatus::Completed) + count(TransactionStatus::Failed),
        28
    );
}

#[tokio::test]
async fn a_sweep_writes_its_curve_as_json_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("curve");
    let out = out.to_str().unwrap();
    bench(&[
        "--mode",
        "orchestration",
        "--sweep",
        "1,3",
        "--count",
        "12",
        "--warmup",
        "2",
        "--out",
        out,
    ])
    .await;
    let json = std::fs::read_to_string(format!("{out}.json")).unwrap();
    assert_eq!(json.matches("\"concurrency\"").count(), 2, "{json}");
    assert!(json.contains("\"concurrency\":3"), "{json}");
    let svg = std::fs::read_to_string(format!("{out}.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
}
