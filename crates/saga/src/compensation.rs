//! The compensation policy as a pure state machine, shared by the
//! choreography compensation handler and the orchestrating coordinator.
//!
//! After a step fails: undo the steps that succeeded, newest first (LIFO);
//! retry an undo that reports failure a few times, then record it as failed
//! and go on with the others (best effort); finish with the lists of undone
//! and failed steps.
//!
//! After a saga times out, which steps ran is not known (a late step may
//! still run), so every step is asked at once to undo itself or, if it never
//! ran, to fence itself off. Each request queues behind that step's trigger
//! in the owner's ordered stream, so a step that runs late is undone right
//! after; one owner being down holds back only its own step, not the refund.

use sagamesh_proto::v1::Step;

use crate::{STEPS, steps_to_compensate};

/// Tries of one step's compensation before it is given up as failed.
pub const MAX_COMPENSATION_ATTEMPTS: u32 = 3;

/// One saga's compensation in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompensationPlan {
    pub failed_step: Step,
    pub reason: String,
    /// Steps still to undo with their current attempt, newest first; in a
    /// LIFO plan only the head is in flight.
    pub remaining: Vec<(Step, u32)>,
    /// All remaining steps are in flight at once (after a timeout).
    pub parallel: bool,
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
    /// Starts compensating after `failed_step` failed: LIFO.
    pub fn start(failed_step: Step, reason: String) -> (CompensationPlan, Vec<PlanAction>) {
        let remaining = steps_to_compensate(failed_step)
            .into_iter()
            .map(|s| (s, 1))
            .collect();
        CompensationPlan::new(failed_step, reason, remaining, false)
    }

    /// Starts compensating a saga that timed out waiting for `pending`:
    /// every step at once.
    pub fn timed_out(pending: Step, reason: String) -> (CompensationPlan, Vec<PlanAction>) {
        let remaining = STEPS.iter().rev().map(|s| (*s, 1)).collect();
        CompensationPlan::new(pending, reason, remaining, true)
    }

    fn new(
        failed_step: Step,
        reason: String,
        remaining: Vec<(Step, u32)>,
        parallel: bool,
    ) -> (CompensationPlan, Vec<PlanAction>) {
        let mut plan = CompensationPlan {
            failed_step,
            reason,
            remaining,
            parallel,
            compensated: Vec::new(),
            failed: Vec::new(),
            finished: false,
        };
        let actions = if plan.parallel {
            let mut actions: Vec<PlanAction> = plan
                .remaining
                .iter()
                .map(|(step, attempt)| PlanAction::Compensate {
                    step: *step,
                    attempt: *attempt,
                })
                .collect();
            actions.extend(plan.finish_if_done());
            actions
        } else {
            plan.next()
        };
        (plan, actions)
    }

    /// The position of `step` if it is in flight now.
    fn in_flight(&self, step: Step) -> Option<usize> {
        match self.remaining.iter().position(|(s, _)| *s == step) {
            Some(0) => Some(0),
            Some(position) if self.parallel => Some(position),
            _ => None,
        }
    }

    /// The step's owner undid it. Stale answers (a step not in flight, or
    /// after the end) change nothing.
    pub fn on_compensated(&mut self, step: Step) -> Vec<PlanAction> {
        let Some(position) = self.in_flight(step).filter(|_| !self.finished) else {
            return Vec::new();
        };
        self.remaining.remove(position);
        self.compensated.push(step);
        self.next()
    }

    /// The step's owner could not undo it on `attempt`.
    pub fn on_compensation_failed(&mut self, step: Step, attempt: u32, reason: &str) -> Vec<PlanAction> {
        let Some(position) = self.in_flight(step).filter(|_| !self.finished) else {
            return Vec::new();
        };
        let current = &mut self.remaining[position].1;
        if attempt != *current {
            return Vec::new();
        }
        if *current < MAX_COMPENSATION_ATTEMPTS {
            *current += 1;
            return vec![PlanAction::Compensate {
                step,
                attempt: *current,
            }];
        }
        self.remaining.remove(position);
        self.failed.push(step);
        let mut actions = vec![PlanAction::GaveUp {
            step,
            reason: reason.to_owned(),
        }];
        actions.extend(self.next());
        actions
    }

    /// The attempt in flight for `step`, if its undo is in flight.
    pub fn attempt_of(&self, step: Step) -> Option<u32> {
        self.in_flight(step).map(|position| self.remaining[position].1)
    }

    pub fn needs_attention(&self) -> bool {
        !self.failed.is_empty()
    }

    /// After a step is done: the next request (LIFO), or the end.
    fn next(&mut self) -> Vec<PlanAction> {
        if self.parallel {
            return self.finish_if_done();
        }
        match self.remaining.first() {
            Some((step, attempt)) => vec![PlanAction::Compensate {
                step: *step,
                attempt: *attempt,
            }],
            None => self.finish_if_done(),
        }
    }

    fn finish_if_done(&mut self) -> Vec<PlanAction> {
        if self.remaining.is_empty() && !self.finished {
            self.finished = true;
            vec![PlanAction::Finish]
        } else {
            Vec::new()
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
        let remaining: Vec<String> = self
            .remaining
            .iter()
            .map(|(s, attempt)| format!("{}:{attempt}", *s as i32))
            .collect();
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.failed_step as i32,
            u8::from(self.parallel),
            remaining.join(","),
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
        let failed_step = step(parts.next()?)?;
        let parallel = parts.next()? == "1";
        let remaining = parts
            .next()?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|entry| {
                let (s, attempt) = entry.split_once(':')?;
                Some((step(s)?, attempt.parse().ok()?))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(CompensationPlan {
            failed_step,
            parallel,
            remaining,
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
    fn a_timeout_asks_every_step_at_once() {
        let (mut plan, actions) = CompensationPlan::timed_out(Step::LogRecord, "deadline".into());
        assert_eq!(actions.len(), 4);
        assert_eq!(
            actions[0],
            PlanAction::Compensate {
                step: Step::Notification,
                attempt: 1
            }
        );
        // The refund does not wait for the step whose service is down.
        assert_eq!(plan.on_compensated(Step::UserValidation), vec![]);
        assert_eq!(plan.on_compensated(Step::Notification), vec![]);
        assert_eq!(plan.on_compensated(Step::ItemGrant), vec![]);
        assert_eq!(plan.on_compensated(Step::LogRecord), vec![PlanAction::Finish]);
    }

    #[test]
    fn encodes_and_decodes() {
        let (mut plan, _) = CompensationPlan::start(Step::Notification, "a|b".into());
        plan.on_compensated(Step::LogRecord);
        plan.on_compensation_failed(Step::ItemGrant, 1, "no");
        assert_eq!(CompensationPlan::decode(&plan.encode()), Some(plan));
        let (timed_out, _) = CompensationPlan::timed_out(Step::ItemGrant, "late".into());
        assert_eq!(CompensationPlan::decode(&timed_out.encode()), Some(timed_out));
        assert_eq!(CompensationPlan::decode("garbage"), None);
    }
}
