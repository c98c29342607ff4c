//! What the machine allows at the moment of a bench run: how long a small
//! fdatasync takes, and how long one thread takes to wake another and hear
//! back. Every purchase waits on both, several times over, and a virtual
//! machine's figures for them change from hour to hour; printed beside a
//! run's results, they tell which kind of hour it had.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Syncs timed, each of one 4 KB write.
const SYNCS: usize = 100;
/// Round trips between two threads timed.
const WAKE_UPS: usize = 2_000;
const BLOCK: usize = 4096;
/// The file's size in blocks, all written before the timing: rewritten in
/// place, a sync carries data, not new blocks or a growing file's metadata
/// (as with a reused WAL).
const BLOCKS: u64 = 64;

/// The medians of this machine's two waits, in microseconds.
#[derive(Clone, Copy)]
pub struct Floor {
    pub fdatasync_us: f64,
    pub wake_up_round_trip_us: f64,
}

impl Floor {
    /// Times both, the syncs on a file in `dir`. Blocks for about 100
    /// fsyncs and 2,000 wake-ups: a fraction of a second on a fast disk,
    /// longer on a slow one.
    pub fn measure(dir: &Path) -> std::io::Result<Floor> {
        Ok(Floor {
            fdatasync_us: median_us(fdatasyncs(dir)?),
            wake_up_round_trip_us: median_us(wake_up_round_trips()),
        })
    }
}

fn fdatasyncs(dir: &Path) -> std::io::Result<Vec<Duration>> {
    // A new file of its own, removed when dropped.
    let file = tempfile::Builder::new()
        .prefix(".sagamesh-bench-sync-")
        .tempfile_in(dir)?;
    time_syncs(file.as_file())
}

fn time_syncs(file: &File) -> std::io::Result<Vec<Duration>> {
    let block = [0x5a_u8; BLOCK];
    for n in 0..BLOCKS {
        file.write_all_at(&block, n * BLOCK as u64)?;
    }
    file.sync_all()?;
    let mut times = Vec::with_capacity(SYNCS);
    for n in 0..SYNCS as u64 {
        file.write_all_at(&block, (n % BLOCKS) * BLOCK as u64)?;
        let started = Instant::now();
        file.sync_data()?;
        times.push(started.elapsed());
    }
    Ok(times)
}

/// One thread sends, another that was asleep answers: two wake-ups each.
fn wake_up_round_trips() -> Vec<Duration> {
    let (ping, pinged) = mpsc::sync_channel::<()>(1);
    let (pong, ponged) = mpsc::sync_channel::<()>(1);
    let echo = std::thread::spawn(move || {
        while pinged.recv().is_ok() {
            if pong.send(()).is_err() {
                return;
            }
        }
    });
    let mut times = Vec::with_capacity(WAKE_UPS);
    for _ in 0..WAKE_UPS {
        let started = Instant::now();
        if ping.send(()).is_err() || ponged.recv().is_err() {
            break;
        }
        times.push(started.elapsed());
    }
    drop(ping);
    let _ = echo.join();
    times
}

fn median_us(mut times: Vec<Duration>) -> f64 {
    if times.is_empty() {
        return 0.0;
    }
    times.sort_unstable();
    times[times.len() / 2].as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_waits_are_measured_and_the_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let floor = Floor::measure(dir.path()).unwrap();
        assert!(floor.fdatasync_us > 0.0);
        assert!(floor.wake_up_round_trip_us > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_directory_that_does_not_exist_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Floor::measure(&dir.path().join("missing")).is_err());
    }
}
