//! Step durations for `GetStats`, since the coordinator started: one
//! histogram per step, fed as step events are applied.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use sagamesh_proto::v1::{Step, StepDurationStats};

pub(crate) struct StepStats {
    /// Microseconds per step, in saga order.
    histograms: Mutex<Vec<Histogram<u64>>>,
}

impl StepStats {
    pub(crate) fn new() -> StepStats {
        let histograms = sagamesh_saga::STEPS
            .iter()
            .map(|_| {
                Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("bounds from 1 µs to an hour are valid")
            })
            .collect();
        StepStats {
            histograms: Mutex::new(histograms),
        }
    }

    pub(crate) fn record(&self, step: Step, duration: Duration) {
        let Some(index) = sagamesh_saga::STEPS.iter().position(|s| *s == step) else {
            return;
        };
        let micros = (duration.as_micros() as u64).max(1);
        let mut histograms = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        histograms[index].saturating_record(micros);
    }

    pub(crate) fn snapshot(&self) -> Vec<StepDurationStats> {
        let histograms = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        sagamesh_saga::STEPS
            .iter()
            .zip(histograms.iter())
            .map(|(step, h)| {
                let micros = |v: u64| Some(sagamesh_proto::duration(Duration::from_micros(v)));
                StepDurationStats {
                    step: *step as i32,
                    count: h.len(),
                    average: micros(h.mean() as u64),
                    p50: micros(h.value_at_quantile(0.5)),
                    p99: micros(h.value_at_quantile(0.99)),
                }
            })
            .collect()
    }
}
