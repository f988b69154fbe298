//! Benchmark ablations: `bench-step --ablate fill_cache,teacher_thread,...`
//! (or `KVD_ABLATE`, read by the binary) turns the named speed-ups off, so one
//! benchmark run can time the step with and without each (`ABLATE=...` in
//! bench/gpu_step.sh). Results are the same either way.

use std::sync::RwLock;

/// A speed-up of the training step that a benchmark can turn off.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SpeedUp {
    /// The encoder's last layer computes only its K/V ([`crate::model::Model::fill_cache`]).
    FillCache,
    /// The teacher's layers after the scorer's run on a second host thread.
    TeacherThread,
    /// The step reads the loss back after launching the backward, not before.
    DeferredLoss,
}

impl SpeedUp {
    const ALL: [SpeedUp; 3] = [
        SpeedUp::FillCache,
        SpeedUp::TeacherThread,
        SpeedUp::DeferredLoss,
    ];

    /// The name `--ablate` uses.
    pub fn name(self) -> &'static str {
        match self {
            SpeedUp::FillCache => "fill_cache",
            SpeedUp::TeacherThread => "teacher_thread",
            SpeedUp::DeferredLoss => "deferred_loss",
        }
    }
}

/// An unknown name in a list of speed-ups.
#[derive(Debug, thiserror::Error)]
#[error("unknown speed-up `{name}` (known: fill_cache, teacher_thread, deferred_loss)")]
pub struct UnknownSpeedUp {
    /// The name given.
    pub name: String,
}

impl SpeedUp {
    /// Parses a comma-separated list of names (empty: none).
    pub fn parse_list(spec: &str) -> Result<Vec<SpeedUp>, UnknownSpeedUp> {
        spec.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|name| {
                SpeedUp::ALL
                    .iter()
                    .copied()
                    .find(|s| s.name() == name)
                    .ok_or_else(|| UnknownSpeedUp { name: name.into() })
            })
            .collect()
    }
}

/// The speed-ups turned off for this process (none unless [`turn_off`] ran).
static OFF: RwLock<Vec<SpeedUp>> = RwLock::new(Vec::new());

/// Turns the speed-ups `off` off for the rest of the process (a benchmark's
/// `--ablate` flag; the library never reads the environment).
pub fn turn_off(off: &[SpeedUp]) {
    if !off.is_empty() {
        tracing::info!(off = ?off, "speed-ups turned off");
    }
    *OFF.write().unwrap_or_else(|p| p.into_inner()) = off.to_vec();
}

/// Whether `s` is on, i.e. not turned off by [`turn_off`].
pub fn on(s: SpeedUp) -> bool {
    !OFF.read().unwrap_or_else(|p| p.into_inner()).contains(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_unknown_names_are_refused() {
        assert_eq!(
            SpeedUp::parse_list(" fill_cache,deferred_loss ").expect("parse"),
            vec![SpeedUp::FillCache, SpeedUp::DeferredLoss]
        );
        assert!(SpeedUp::parse_list("").expect("empty").is_empty());
        let e = SpeedUp::parse_list("fill_cache,warp_speed").expect_err("unknown");
        assert!(e.to_string().contains("`warp_speed`"), "{e}");
    }
}
