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
//!
//! Only a thread at the default nice value changes: setting the policy
//! also sets the nice value (to 0, here), and a process started with
//! another one (`nice`, systemd's `Nice=`) keeps it unchanged.

/// Marks the calling thread as batch work when its nice value is the
/// default. Otherwise, or when the system refuses, the thread stays as it
/// was, which is correct, only slower under load.
pub(crate) fn run_as_batch_work() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityOsValue, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        let nice = nice_value();
        if nice != Some(0) {
            tracing::debug!(
                ?nice,
                "store thread keeps its scheduling: its nice value is not the default"
            );
            return;
        }
        // Static priority 0 and nice 0, the defaults: only the policy changes.
        let set = set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Os(ThreadPriorityOsValue::default()),
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch),
        );
        if let Err(e) = set {
            tracing::debug!(error = ?e, "store thread keeps its scheduling");
        }
    }
}

/// The calling thread's nice value, from `/proc/thread-self/stat`.
#[cfg(target_os = "linux")]
fn nice_value() -> Option<i64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The name, field 2, is in parentheses and may hold spaces; the nice
    // value is field 19, the 17th after the closing parenthesis.
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(16)?.parse().ok()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy, thread_schedule_policy};

    use super::*;

    #[test]
    fn a_store_thread_runs_as_batch_work_and_others_do_not() {
        let before = thread_schedule_policy().unwrap();
        // Under `nice`, store threads keep their scheduling.
        let expected = match nice_value() {
            Some(0) => ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch),
            _ => before,
        };
        let policy = std::thread::spawn(|| {
            run_as_batch_work();
            thread_schedule_policy().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(policy, expected);
        assert_eq!(
            thread_schedule_policy().unwrap(),
            before,
            "only the thread that asked changes"
        );
    }

    #[test]
    fn a_thread_with_another_nice_value_keeps_its_scheduling() {
        let (nice, policy) = std::thread::spawn(|| {
            // Raising a thread's nice value needs no privilege.
            thread_priority::set_thread_priority_and_policy(
                thread_priority::thread_native_id(),
                thread_priority::ThreadPriority::Min,
                ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
            )
            .unwrap();
            run_as_batch_work();
            (nice_value(), thread_schedule_policy().unwrap())
        })
        .join()
        .unwrap();
        assert!(nice.is_some_and(|nice| nice > 0), "nice value {nice:?}");
        assert_eq!(
            policy,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other)
        );
    }
}
