//! How the store's own threads are scheduled.
//!
//! A writer thread sleeps until a caller queues a write. By default Linux
//! lets a woken thread preempt the one that woke it, so the async worker
//! that queued one write lost its CPU to the writer at once, and the
//! writer committed a batch of one while the worker's other tasks, each
//! about to queue a write of its own, waited. Scheduled as batch work
//! (`SCHED_BATCH`, same priority, no wakeup preemption), the writer runs
//! when a CPU is free or the worker's time slice ends: on an idle machine
//! that is at once, and on a busy one the worker first queues the writes
//! it has, and one commit and one fsync cover them all.

/// Marks the calling thread as batch work. A failure leaves the thread as
/// it was, which is correct, only slower under load.
pub(crate) fn run_as_batch_work() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityOsValue, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        // Static priority 0 and nice 0, the defaults: only the policy changes.
        let set = set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Os(ThreadPriorityOsValue::default()),
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch),
        );
        if let Err(e) = set {
            tracing::debug!(error = ?e, "store thread keeps the default scheduling");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy, thread_schedule_policy};

    use super::*;

    #[test]
    fn a_store_thread_runs_as_batch_work_and_others_do_not() {
        let policy = std::thread::spawn(|| {
            run_as_batch_work();
            thread_schedule_policy().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(
            policy,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch)
        );
        assert_eq!(
            thread_schedule_policy().unwrap(),
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
            "only the thread that asked changes"
        );
    }
}
