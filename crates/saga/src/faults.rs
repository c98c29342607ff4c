//! Fault injection (`SAGAMESH_FAULTS`), for tests and demos.
//!
//! The syntax is a comma-separated list of `target=fault`, where a target is
//! a step (`user_validation`, `item_grant`, `log_record`, `notification`) or
//! the compensation of one (`item_grant.compensation`), and a fault is
//! `fail` (a business failure: the step publishes its `*Failed` event) or
//! `error` (a transient error: the delivery is nacked and retried until it is
//! dead-lettered). Example: `log_record=fail,item_grant.compensation=fail`.

use std::collections::HashMap;

use sagamesh_proto::v1::Step;

use crate::STEPS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The step fails as a business failure.
    Fail,
    /// The handler errors before doing anything; the router retries.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    Step(Step),
    Compensation(Step),
}

/// The faults in force for a process; empty by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    faults: HashMap<Target, Fault>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("SAGAMESH_FAULTS entry '{0}' is not of the form target=fault")]
    Malformed(String),
    #[error(
        "SAGAMESH_FAULTS names unknown step '{0}' (known: user_validation, item_grant, log_record, notification)"
    )]
    UnknownStep(String),
    #[error("SAGAMESH_FAULTS names unknown fault '{0}' (known: fail, error)")]
    UnknownFault(String),
}

impl Faults {
    pub fn parse(spec: &str) -> Result<Faults, FaultError> {
        let mut faults = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (target, fault) = entry
                .split_once('=')
                .ok_or_else(|| FaultError::Malformed(entry.to_owned()))?;
            let (step_name, compensation) = match target.trim().strip_suffix(".compensation") {
                Some(step) => (step, true),
                None => (target.trim(), false),
            };
            let step = STEPS
                .into_iter()
                .find(|s| s.name() == step_name)
                .ok_or_else(|| FaultError::UnknownStep(step_name.to_owned()))?;
            let fault = match fault.trim() {
                "fail" => Fault::Fail,
                "error" => Fault::Error,
                other => return Err(FaultError::UnknownFault(other.to_owned())),
            };
            let target = if compensation {
                Target::Compensation(step)
            } else {
                Target::Step(step)
            };
            faults.insert(target, fault);
        }
        Ok(Faults { faults })
    }

    /// The fault injected into a step, if any.
    pub fn step(&self, step: Step) -> Option<Fault> {
        self.faults.get(&Target::Step(step)).copied()
    }

    /// The fault injected into a step's compensation, if any.
    pub fn compensation(&self, step: Step) -> Option<Fault> {
        self.faults.get(&Target::Compensation(step)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_and_compensations() {
        let faults = Faults::parse("log_record=fail, item_grant.compensation=error").unwrap();
        assert_eq!(faults.step(Step::LogRecord), Some(Fault::Fail));
        assert_eq!(faults.step(Step::ItemGrant), None);
        assert_eq!(faults.compensation(Step::ItemGrant), Some(Fault::Error));
        assert!(Faults::parse("").unwrap().step(Step::LogRecord).is_none());
    }

    #[test]
    fn rejects_unknown_names() {
        assert!(matches!(
            Faults::parse("payment=fail"),
            Err(FaultError::UnknownStep(_))
        ));
        assert!(matches!(
            Faults::parse("log_record=boom"),
            Err(FaultError::UnknownFault(_))
        ));
        assert!(matches!(
            Faults::parse("log_record"),
            Err(FaultError::Malformed(_))
        ));
    }
}
