//! The saga's vocabulary, shared by the coordinator and every handler: the
//! order of the steps, who subscribes to what, the input rules, and fault
//! injection. It knows nothing of storage or gRPC.

mod faults;
mod input;
mod topology;

pub use faults::{Fault, FaultError, Faults};
pub use input::{InputError, MAX_ID_LEN, MAX_QUANTITY, validate_id, validate_quantity};
pub use topology::{Subscription, choreography};

use sagamesh_proto::v1::Step;

/// The business steps in the order they run.
pub const STEPS: [Step; 4] = [
    Step::UserValidation,
    Step::ItemGrant,
    Step::LogRecord,
    Step::Notification,
];

/// The steps that succeeded before `failed` failed, newest first: the order
/// in which they are compensated (LIFO).
pub fn steps_to_compensate(failed: Step) -> Vec<Step> {
    let position = STEPS.iter().position(|s| *s == failed).unwrap_or(0);
    STEPS[..position].iter().rev().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compensation_runs_newest_first() {
        assert_eq!(steps_to_compensate(Step::UserValidation), vec![]);
        assert_eq!(
            steps_to_compensate(Step::Notification),
            vec![Step::LogRecord, Step::ItemGrant, Step::UserValidation]
        );
    }
}
