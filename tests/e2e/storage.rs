//! Storage faults: a full disk surfaces as a retryable error to the caller
//! and in the logs, loses nothing acknowledged, and the mesh recovers by
//! itself once space is free again.
//!
//! The mesh's data lives on a small tmpfs mounted for the test, filled with
//! a ballast file. Mounting needs root, which CI has; elsewhere the test
//! says why and skips.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sagamesh_proto::v1::{PurchaseRequest, SagaMode, TransactionStatus};
use tonic::Code;

use crate::support::{Mesh, eventually};

/// A tmpfs mounted for one test; unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir_all(&path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}M"), "tmpfs"])
            .arg(&path)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !mounted {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must be able to mount a tmpfs (it runs as root)"
            );
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { path, _dir: dir })
    }

    /// Fills the disk with a ballast file; returns its path.
    fn fill(&self) -> PathBuf {
        let ballast = self.path.join("ballast");
        let mut file = std::fs::File::create(&ballast).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn purchase(key: &str) -> PurchaseRequest {
    PurchaseRequest {
        user_id: "quinn".into(),
        item_id: "drum".into(),
        quantity: 1,
        idempotency_key: key.into(),
    }
}

#[tokio::test]
async fn a_full_disk_is_an_error_and_the_mesh_recovers_when_space_returns() {
    let Some(disk) = SmallDisk::mount(8) else { return };
    let data: &Path = &disk.path.join("data");
    let mesh = Mesh::start_in(data, SagaMode::Choreography, |_| {}).await;
    let c = &mesh.clients;
    c.create_user("quinn", 10_000).await;
    c.create_item("drum", 10, 1_000).await;
    let mut accepted = Vec::new();
    for n in 0..5 {
        let id = c
            .coordinator
            .clone()
            .purchase(purchase(&format!("before-{n}")))
            .await
            .unwrap()
            .into_inner();
        accepted.push(id.transaction_id);
    }
    for id in &accepted {
        c.follow(id).await;
    }

    let ballast = disk.fill();
    let mut refused = 0;
    for n in 0..20 {
        match c
            .coordinator
            .clone()
            .purchase(purchase(&format!("full-{n}")))
            .await
        {
            Ok(response) => accepted.push(response.into_inner().transaction_id),
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::Unavailable,
                    "a full disk is retryable: {status}"
                );
                assert!(status.message().contains("try again"), "{}", status.message());
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "a full disk refuses new purchases");

    std::fs::remove_file(ballast).unwrap();
    let recovered = eventually("purchases to be taken again", || {
        let mut coordinator = c.coordinator.clone();
        async move { coordinator.purchase(purchase("after")).await.ok() }
    })
    .await;
    accepted.push(recovered.into_inner().transaction_id);
    let mut spent = 0;
    for id in &accepted {
        let (_, done) = c.follow(id).await;
        assert_eq!(done.status(), TransactionStatus::Completed, "{done:?}");
        spent += done.total_price;
    }
    assert_eq!(
        c.balance("quinn").await + spent,
        10_000,
        "nothing acknowledged was lost or doubled"
    );
    assert_eq!(c.held("quinn", "drum").await, accepted.len() as u64);
    drop(mesh);
}
