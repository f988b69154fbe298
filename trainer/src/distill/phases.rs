//! Opt-in wall-clock timing of the training step's phases (teacher, scorer,
//! encoder, decoder, loss, backward, optimizer), for profiling. Off unless
//! [`set_enabled`] turned it on (`bench-step --step-phases`); when on, each
//! mark synchronizes the device first, so the times are the phases' device
//! times (and the step is slower by the synchronizations).

use crate::device::synchronize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;
use tch::Device;

static ON: AtomicBool = AtomicBool::new(false);

/// Turns phase timing on or off for the rest of the process.
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether phase timing is on.
pub(crate) fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
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
