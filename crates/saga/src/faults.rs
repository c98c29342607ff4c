//! Fault injection (`SAGAMESH_FAULTS`), for tests, demos and the chaos test.
//!
//! The syntax is a comma-separated list of `target=fault`, optionally
//! `target=fault@probability`:
//! - a target is a step (`user_validation`, `item_grant`, `log_record`,
//!   `notification`), the compensation of one (`item_grant.compensation`), or
//!   `router`;
//! - a step's fault is `fail` (a business failure: the step publishes its
//!   `*Failed` event) or `error` (a transient error: the delivery is nacked
//!   and retried until it is dead-lettered); the router's is `drop_stream`
//!   (it breaks a handler's stream as it delivers to it);
//! - the probability (0..=1, default 1) applies per transaction for `fail`
//!   (the same saga always gets the same answer) and per try for `error` and
//!   `drop_stream`.
//!
//! Example: `log_record=fail@0.05,item_grant=error@0.02,router=drop_stream@0.001`.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

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
    faults: HashMap<Target, (Fault, f64)>,
    drop_stream: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("SAGAMESH_FAULTS entry '{0}' is not of the form target=fault or target=fault@probability")]
    Malformed(String),
    #[error(
        "SAGAMESH_FAULTS names unknown target '{0}' (known: user_validation, item_grant, log_record, notification, <step>.compensation, router)"
    )]
    UnknownStep(String),
    #[error("SAGAMESH_FAULTS names unknown fault '{0}' (known: fail, error; for the router: drop_stream)")]
    UnknownFault(String),
    #[error("SAGAMESH_FAULTS probability '{0}' is not a number between 0 and 1")]
    Probability(String),
}

impl Faults {
    pub fn parse(spec: &str) -> Result<Faults, FaultError> {
        let mut faults = Faults::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (target, fault) = entry
                .split_once('=')
                .ok_or_else(|| FaultError::Malformed(entry.to_owned()))?;
            let (fault, probability) = match fault.trim().split_once('@') {
                Some((fault, p)) => {
                    let p: f64 = p
                        .trim()
                        .parse()
                        .map_err(|_| FaultError::Probability(p.to_owned()))?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err(FaultError::Probability(p.to_string()));
                    }
                    (fault.trim(), p)
                }
                None => (fault.trim(), 1.0),
            };
            let target = target.trim();
            if target == "router" {
                match fault {
                    "drop_stream" => faults.drop_stream = probability,
                    other => return Err(FaultError::UnknownFault(other.to_owned())),
                }
                continue;
            }
            let (step_name, compensation) = match target.strip_suffix(".compensation") {
                Some(step) => (step, true),
                None => (target, false),
            };
            let step = STEPS
                .into_iter()
                .find(|s| s.name() == step_name)
                .ok_or_else(|| FaultError::UnknownStep(step_name.to_owned()))?;
            let fault = match fault {
                "fail" => Fault::Fail,
                "error" => Fault::Error,
                other => return Err(FaultError::UnknownFault(other.to_owned())),
            };
            let target = if compensation {
                Target::Compensation(step)
            } else {
                Target::Step(step)
            };
            faults.faults.insert(target, (fault, probability));
        }
        Ok(faults)
    }

    /// The fault injected into a step of a transaction, if any.
    pub fn step(&self, step: Step, transaction_id: &str) -> Option<Fault> {
        self.decide(Target::Step(step), transaction_id)
    }

    /// The fault injected into a step's compensation, if any.
    pub fn compensation(&self, step: Step, transaction_id: &str) -> Option<Fault> {
        self.decide(Target::Compensation(step), transaction_id)
    }

    /// The chance that the router breaks a stream as it delivers to it.
    pub fn drop_stream_probability(&self) -> f64 {
        self.drop_stream
    }

    fn decide(&self, target: Target, transaction_id: &str) -> Option<Fault> {
        let (fault, probability) = *self.faults.get(&target)?;
        let draw = match fault {
            // Stable per saga, so every redelivery gets the same answer.
            Fault::Fail => {
                let mut hasher = DefaultHasher::new();
                (transaction_id, target).hash(&mut hasher);
                (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
            }
            Fault::Error => rand::random::<f64>(),
        };
        (draw < probability).then_some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_and_compensations() {
        let faults = Faults::parse("log_record=fail, item_grant.compensation=error").unwrap();
        assert_eq!(faults.step(Step::LogRecord, "t"), Some(Fault::Fail));
        assert_eq!(faults.step(Step::ItemGrant, "t"), None);
        assert_eq!(faults.compensation(Step::ItemGrant, "t"), Some(Fault::Error));
        assert!(Faults::parse("").unwrap().step(Step::LogRecord, "t").is_none());
    }

    #[test]
    fn a_probable_failure_is_stable_per_transaction() {
        let faults = Faults::parse("item_grant=fail@0.3,router=drop_stream@0.01").unwrap();
        let failing = (0..1000)
            .filter(|i| faults.step(Step::ItemGrant, &format!("tx-{i}")).is_some())
            .count();
        assert!((200..400).contains(&failing), "{failing} of 1000 failed");
        for i in 0..50 {
            let tx = format!("tx-{i}");
            assert_eq!(
                faults.step(Step::ItemGrant, &tx),
                faults.step(Step::ItemGrant, &tx)
            );
        }
        assert_eq!(faults.drop_stream_probability(), 0.01);
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
        assert!(matches!(
            Faults::parse("log_record=fail@2"),
            Err(FaultError::Probability(_))
        ));
        assert!(matches!(
            Faults::parse("router=fail"),
            Err(FaultError::UnknownFault(_))
        ));
    }
}
