//! The compensation policy as a pure state machine, shared by the
//! choreography compensation handler and the orchestrating coordinator:
//! undo the steps that succeeded, newest first (LIFO); retry an undo that
//! reports failure a few times; then record it as failed and go on with the
//! others (best effort); finish with the lists of undone and failed steps.

use sagamesh_proto::v1::Step;

use crate::steps_to_compensate;

/// Tries of one step's compensation before it is given up as failed.
pub const MAX_COMPENSATION_ATTEMPTS: u32 = 3;

/// One saga's compensation in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompensationPlan {
    pub failed_step: Step,
    pub reason: String,
    /// Steps still to undo, newest first; the head is being undone.
    pub remaining: Vec<Step>,
    /// The attempt of the head's undo now in flight.
    pub attempt: u32,
    pub compensated: Vec<Step>,
    pub failed: Vec<Step>,
    pub finished: bool,
}

/// What the plan asks its owner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanAction {
    /// Ask the step's owner to undo it.
    Compensate { step: Step, attempt: u32 },
    /// A step's undo failed for good; raise it.
    GaveUp { step: Step, reason: String },
    /// Every step is handled: publish the end of the saga.
    Finish,
}

impl CompensationPlan {
    /// Starts compensating after `failed_step` failed.
    pub fn start(failed_step: Step, reason: String) -> (CompensationPlan, Vec<PlanAction>) {
        let mut plan = CompensationPlan {
            failed_step,
            reason,
            remaining: steps_to_compensate(failed_step),
            attempt: 1,
            compensated: Vec::new(),
            failed: Vec::new(),
            finished: false,
        };
        let actions = plan.next();
        (plan, actions)
    }

    /// The head's owner undid it. Stale answers (another step, or after the
    /// end) change nothing.
    pub fn on_compensated(&mut self, step: Step) -> Vec<PlanAction> {
        if self.finished || self.remaining.first() != Some(&step) {
            return Vec::new();
        }
        self.remaining.remove(0);
        self.compensated.push(step);
        self.attempt = 1;
        self.next()
    }

    /// The head's owner could not undo it on `attempt`.
    pub fn on_compensation_failed(&mut self, step: Step, attempt: u32, reason: &str) -> Vec<PlanAction> {
        if self.finished || self.remaining.first() != Some(&step) || attempt != self.attempt {
            return Vec::new();
        }
        if self.attempt < MAX_COMPENSATION_ATTEMPTS {
            self.attempt += 1;
            return vec![PlanAction::Compensate {
                step,
                attempt: self.attempt,
            }];
        }
        self.remaining.remove(0);
        self.failed.push(step);
        self.attempt = 1;
        let mut actions = vec![PlanAction::GaveUp {
            step,
            reason: reason.to_owned(),
        }];
        actions.extend(self.next());
        actions
    }

    pub fn needs_attention(&self) -> bool {
        !self.failed.is_empty()
    }

    fn next(&mut self) -> Vec<PlanAction> {
        match self.remaining.first() {
            Some(step) => vec![PlanAction::Compensate {
                step: *step,
                attempt: self.attempt,
            }],
            None => {
                self.finished = true;
                vec![PlanAction::Finish]
            }
        }
    }

    /// A compact text form, for storing the plan in one column.
    pub fn encode(&self) -> String {
        let steps = |steps: &[Step]| {
            steps
                .iter()
                .map(|s| (*s as i32).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.failed_step as i32,
            self.attempt,
            steps(&self.remaining),
            steps(&self.compensated),
            steps(&self.failed),
            u8::from(self.finished),
            self.reason
        )
    }

    /// The plan `encode` wrote; `None` for anything else.
    pub fn decode(text: &str) -> Option<CompensationPlan> {
        let mut parts = text.splitn(7, '|');
        let step = |n: &str| n.parse::<i32>().ok().and_then(|n| Step::try_from(n).ok());
        let steps = |list: &str| -> Option<Vec<Step>> {
            list.split(',').filter(|s| !s.is_empty()).map(step).collect()
        };
        Some(CompensationPlan {
            failed_step: step(parts.next()?)?,
            attempt: parts.next()?.parse().ok()?,
            remaining: steps(parts.next()?)?,
            compensated: steps(parts.next()?)?,
            failed: steps(parts.next()?)?,
            finished: parts.next()? == "1",
            reason: parts.next()?.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undoes_newest_first_and_finishes() {
        let (mut plan, actions) = CompensationPlan::start(Step::LogRecord, "disk full".into());
        assert_eq!(
            actions,
            vec![PlanAction::Compensate {
                step: Step::ItemGrant,
                attempt: 1
            }]
        );
        assert_eq!(plan.on_compensated(Step::UserValidation), vec![], "stale answer");
        assert_eq!(
            plan.on_compensated(Step::ItemGrant),
            vec![PlanAction::Compensate {
                step: Step::UserValidation,
                attempt: 1
            }]
        );
        assert_eq!(
            plan.on_compensated(Step::UserValidation),
            vec![PlanAction::Finish]
        );
        assert_eq!(plan.compensated, vec![Step::ItemGrant, Step::UserValidation]);
        assert!(!plan.needs_attention());
        assert_eq!(plan.on_compensated(Step::UserValidation), vec![], "after the end");
    }

    #[test]
    fn retries_then_gives_up_and_goes_on() {
        let (mut plan, _) = CompensationPlan::start(Step::LogRecord, "x".into());
        assert_eq!(
            plan.on_compensation_failed(Step::ItemGrant, 1, "no"),
            vec![PlanAction::Compensate {
                step: Step::ItemGrant,
                attempt: 2
            }]
        );
        assert_eq!(
            plan.on_compensation_failed(Step::ItemGrant, 1, "no"),
            vec![],
            "a duplicate of attempt 1"
        );
        plan.on_compensation_failed(Step::ItemGrant, 2, "no");
        let actions = plan.on_compensation_failed(Step::ItemGrant, 3, "no");
        assert_eq!(
            actions,
            vec![
                PlanAction::GaveUp {
                    step: Step::ItemGrant,
                    reason: "no".into()
                },
                PlanAction::Compensate {
                    step: Step::UserValidation,
                    attempt: 1
                }
            ]
        );
        assert_eq!(
            plan.on_compensated(Step::UserValidation),
            vec![PlanAction::Finish]
        );
        assert!(plan.needs_attention());
    }

    #[test]
    fn nothing_to_undo_finishes_at_once() {
        let (plan, actions) = CompensationPlan::start(Step::UserValidation, "no money".into());
        assert_eq!(actions, vec![PlanAction::Finish]);
        assert!(plan.finished);
    }

    #[test]
    fn encodes_and_decodes() {
        let (mut plan, _) = CompensationPlan::start(Step::Notification, "a|b".into());
        plan.on_compensated(Step::LogRecord);
        plan.on_compensation_failed(Step::ItemGrant, 1, "no");
        assert_eq!(CompensationPlan::decode(&plan.encode()), Some(plan));
        assert_eq!(CompensationPlan::decode("garbage"), None);
    }
}
