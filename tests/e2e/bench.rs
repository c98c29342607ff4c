//! `sagamesh bench`: the load generator users reproduce our figures with.
//! Runs it for real on a mesh of its own and checks what it reports.

use std::io::{Read, Seek, SeekFrom};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{DEADLINE, binary};

/// Runs `sagamesh bench <args>`; returns its standard output. Fails the
/// test if the bench has not finished within the deadline.
fn bench(args: &[&str]) -> String {
    // Files rather than pipes: nothing has to read while the bench runs.
    let mut stdout = tempfile::tempfile().unwrap();
    let mut stderr = tempfile::tempfile().unwrap();
    let mut child = Command::new(binary())
        .arg("bench")
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("SAGAMESH_TARGET")
        .stdout(stdout.try_clone().unwrap())
        .stderr(stderr.try_clone().unwrap())
        .spawn()
        .expect("the bench starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("the bench can be waited for") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("bench {args:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |file: &mut std::fs::File| {
        let mut text = String::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_string(&mut text).unwrap();
        text
    };
    let (stdout, stderr) = (read(&mut stdout), read(&mut stderr));
    assert!(status.success(), "bench {args:?} failed: {stdout}\n{stderr}");
    stdout
}

#[test]
fn the_bench_reports_every_purchase_and_the_read_rpcs() {
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
    ]);
    let line = json.lines().last().unwrap_or_default();
    for expected in [
        "\"scenario\":\"mixed\"",
        "\"concurrency\":4",
        "\"purchases\":40",
        "\"errors\":{}",
        "\"get_stats_ms\":{\"p50\":",
        "\"list_first_page_ms\":{\"p50\":",
    ] {
        assert!(line.contains(expected), "{expected} missing from {line}");
    }
}

#[test]
fn a_sweep_writes_its_curve_as_json_and_svg() {
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
    ]);
    let json = std::fs::read_to_string(format!("{out}.json")).unwrap();
    assert_eq!(json.matches("\"concurrency\"").count(), 2, "{json}");
    assert!(json.contains("\"concurrency\":3"), "{json}");
    let svg = std::fs::read_to_string(format!("{out}.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
}
