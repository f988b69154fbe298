//! Benchmark ablations: `KVD_ABLATE=fill_cache,teacher_thread,...` turns the
//! named speed-ups off, so one benchmark run can time the step with and without each
//! (`ABLATE=...` in bench/gpu_step.sh). Results are the same either way.

use std::sync::OnceLock;

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

    /// The name `KVD_ABLATE` uses.
    pub fn name(self) -> &'static str {
        match self {
            SpeedUp::FillCache => "fill_cache",
            SpeedUp::TeacherThread => "teacher_thread",
            SpeedUp::DeferredLoss => "deferred_loss",
        }
    }
}

fn off() -> &'static [SpeedUp] {
    static OFF: OnceLock<Vec<SpeedUp>> = OnceLock::new();
    OFF.get_or_init(|| {
        let spec = std::env::var("KVD_ABLATE").unwrap_or_default();
        let mut off = Vec::new();
        for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match SpeedUp::ALL.iter().find(|s| s.name() == name) {
                Some(s) => off.push(*s),
                None => tracing::warn!(
                    name,
                    known = ?SpeedUp::ALL.map(SpeedUp::name),
                    "KVD_ABLATE names an unknown speed-up; ignored"
                ),
            }
        }
        if !off.is_empty() {
            tracing::info!(off = ?off, "KVD_ABLATE: speed-ups turned off");
        }
        off
    })
}

/// Whether `s` is on, i.e. not named in `KVD_ABLATE`.
pub fn on(s: SpeedUp) -> bool {
    !off().contains(&s)
}
