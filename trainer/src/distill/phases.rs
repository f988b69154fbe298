//! Opt-in wall-clock timing of the training step's phases (teacher, scorer,
//! encoder, decoder, loss, backward, optimizer), for profiling. Off unless the
//! environment sets `KVD_STEP_PHASES=1`; when on, each mark synchronizes the
//! device first, so the times are the phases' device times (and the step is
//! slower by the synchronizations).

use crate::device::synchronize;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;
use tch::Device;

/// Whether phase timing is on (`KVD_STEP_PHASES=1`).
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVD_STEP_PHASES").is_ok_and(|v| v == "1"))
}

fn totals() -> &'static Mutex<BTreeMap<&'static str, f64>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, f64>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Times consecutive phases on one device; a no-op unless enabled.
pub struct PhaseTimer {
    device: Device,
    last: Option<Instant>,
}

impl PhaseTimer {
    /// Starts timing (synchronizes the device when enabled).
    pub fn start(device: Device) -> PhaseTimer {
        let last = enabled().then(|| {
            synchronize(device);
            Instant::now()
        });
        PhaseTimer { device, last }
    }

    /// Ends the current phase, adding its time to `name`'s total.
    pub fn mark(&mut self, name: &'static str) {
        if let Some(t) = self.last {
            synchronize(self.device);
            let now = Instant::now();
            if let Ok(mut m) = totals().lock() {
                *m.entry(name).or_insert(0.0) += (now - t).as_secs_f64();
            }
            self.last = Some(now);
        }
    }
}

impl PhaseTimer {
    /// Restarts the current phase without recording it (time another timer took).
    pub fn skip(&mut self) {
        if self.last.is_some() {
            self.last = Some(Instant::now());
        }
    }
}

/// Takes the accumulated phase totals (seconds) and clears them.
pub fn take() -> BTreeMap<&'static str, f64> {
    totals()
        .lock()
        .map(|mut m| std::mem::take(&mut *m))
        .unwrap_or_default()
}
