//! Fault injection for recovery tests: `--chaos SPEC` of `train` and `worker`
//! (or `KVD_CHAOS`, read by the binary, never by this library).
//!
//! `kill:rank=R:step=S:at=step|upload` makes rank R SIGKILL itself
//! (exactly `kill -9`) during step S (after its forward/backward, before the
//! all-reduce) or during the upload of the checkpoint of step S (after its
//! part is written, before the commit). `alloc:rank=R:step=S`
//! makes rank R's step S ask libtorch for an allocation no device can give
//! (a real allocation failure, in its first micro-batch after the backward; one of several examples is retried in halves). With `--chaos-once FILE` it fires
//! only if FILE does not exist, and creates it, so a restarted worker with
//! the same environment does not die again. `term:...` (same keys) sends
//! SIGTERM instead, as an orchestrator evicting the worker does.

use std::path::PathBuf;

/// Where in a step the fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Inside the training step.
    Step,
    /// Inside the checkpoint upload.
    Upload,
}

/// What a planned fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// This signal (SIGKILL or SIGTERM) to the process.
    Signal(i32),
    /// An allocation that fails, inside the step.
    AllocFail,
}

/// A fault specification that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fault injection spec `{spec}`: {why}")]
pub struct ChaosError {
    /// The spec given.
    pub spec: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// A planned fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chaos {
    action: Action,
    rank: u32,
    step: u64,
    phase: Phase,
    once: Option<PathBuf>,
}

impl Chaos {
    /// Fires only if `marker` does not exist, and creates it (so a restarted
    /// process with the same settings does not fail again).
    pub fn once(mut self, marker: Option<PathBuf>) -> Self {
        self.once = marker;
        self
    }

    /// Parses `kill|term:rank=R:step=S:at=step|upload` or `alloc:rank=R:step=S`.
    pub fn parse(spec: &str) -> Result<Self, ChaosError> {
        let bad = |why: &'static str| ChaosError {
            spec: spec.to_string(),
            why,
        };
        let mut parts = spec.split(':');
        let action = match parts.next() {
            Some("kill") => Action::Signal(libc::SIGKILL),
            Some("term") => Action::Signal(libc::SIGTERM),
            Some("alloc") => Action::AllocFail,
            _ => return Err(bad("expected `kill:...`, `term:...` or `alloc:...`")),
        };
        let (mut rank, mut step, mut phase) = (None, None, Phase::Step);
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad("expected key=value"))?;
            match k {
                "rank" => rank = Some(v.parse().map_err(|_| bad("bad rank"))?),
                "step" => step = Some(v.parse().map_err(|_| bad("bad step"))?),
                "at" => {
                    phase = match v {
                        "step" => Phase::Step,
                        "upload" => Phase::Upload,
                        _ => return Err(bad("at must be step or upload")),
                    }
                }
                _ => return Err(bad("unknown key")),
            }
        }
        if action == Action::AllocFail && phase != Phase::Step {
            return Err(bad("alloc fires in a step only"));
        }
        Ok(Self {
            action,
            rank: rank.ok_or_else(|| bad("rank is required"))?,
            step: step.ok_or_else(|| bad("step is required"))?,
            phase,
            once: None,
        })
    }

    /// Whether an allocation failure is planned for (rank, step).
    pub fn fails_alloc(&self, rank: usize, step: u64) -> bool {
        self.action == Action::AllocFail && self.rank as usize == rank && self.step == step
    }

    /// Sends this process its signal (SIGKILL or SIGTERM) if such a fault is
    /// planned for (rank, step, phase).
    pub fn maybe_kill(&self, rank: usize, step: u64, phase: Phase) {
        let Action::Signal(signal) = self.action else {
            return;
        };
        if self.rank as usize != rank || self.step != step || self.phase != phase {
            return;
        }
        if let Some(marker) = &self.once {
            if marker.exists() {
                return;
            }
            let _ = std::fs::write(marker, format!("killed rank {rank} at step {step}\n"));
        }
        let name = if signal == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGKILL"
        };
        tracing::warn!(rank, step, ?phase, "chaos: {name} to self");
        // SAFETY: sending a signal to our own pid.
        unsafe {
            libc::kill(libc::getpid(), signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c = Chaos::parse("kill:rank=1:step=3:at=upload").unwrap();
        assert_eq!((c.rank, c.step, c.phase), (1, 3, Phase::Upload));
        assert_eq!(
            Chaos::parse("kill:rank=0:step=2").unwrap().phase,
            Phase::Step
        );
        assert!(Chaos::parse("boom:rank=1").is_err());
        let a = Chaos::parse("alloc:rank=0:step=3").unwrap();
        assert!(a.fails_alloc(0, 3) && !a.fails_alloc(0, 2) && !a.fails_alloc(1, 3));
        assert!(!Chaos::parse("kill:rank=0:step=3")
            .unwrap()
            .fails_alloc(0, 3));
        assert!(Chaos::parse("alloc:rank=0:step=3:at=upload").is_err());
        assert_eq!(
            Chaos::parse("term:rank=0:step=2").unwrap().action,
            Action::Signal(libc::SIGTERM)
        );
        let e = Chaos::parse("kill:step=2").unwrap_err();
        assert_eq!(e.why, "rank is required");
        assert!(e.to_string().contains("`kill:step=2`"), "{e}");
        assert!(Chaos::parse("kill:rank=1:step=x").is_err());
    }
}
