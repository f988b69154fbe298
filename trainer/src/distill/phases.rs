//! Opt-in wall-clock timing of the training step's phases (teacher, scorer,
//! encoder, decoder, loss, backward, optimizer), for profiling. Off unless
//! [`set_enabled`] turned it on (`bench-step --step-phases`); when on, each
//! mark synchronizes the device first, so the times are the phases' device
//! times (and the step is slower by the synchronizations).

use crate::device::synchronize;
use crate::op_count::{self, OpCounts};
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

/// Per phase: seconds, and operators dispatched (with [`crate::op_count`] on).
type Totals = BTreeMap<&'static str, (f64, OpCounts)>;

fn totals() -> &'static Mutex<Totals> {
    static T: OnceLock<Mutex<Totals>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Times consecutive phases on one device; a no-op unless enabled.
pub struct PhaseTimer {
    device: Device,
    last: Option<(Instant, OpCounts)>,
}

impl PhaseTimer {
    /// Starts timing (synchronizes the device when enabled).
    pub fn start(device: Device) -> PhaseTimer {
        let last = enabled().then(|| {
            synchronize(device);
            (Instant::now(), op_count::read())
        });
        PhaseTimer { device, last }
    }

    /// Ends the current phase, adding its time (and operators) to `name`'s total.
    pub fn mark(&mut self, name: &'static str) {
        if let Some((t, ops)) = self.last {
            synchronize(self.device);
            let (now, now_ops) = (Instant::now(), op_count::read());
            if let Ok(mut m) = totals().lock() {
                let e = m.entry(name).or_default();
                e.0 += (now - t).as_secs_f64();
                e.1.add(now_ops.since(ops));
            }
            self.last = Some((now, now_ops));
        }
    }

    /// Restarts the current phase without recording it (time another timer took).
    pub fn skip(&mut self) {
        if self.last.is_some() {
            self.last = Some((Instant::now(), op_count::read()));
        }
    }
}

/// Takes the accumulated phase totals (seconds) and clears them.
pub fn take() -> BTreeMap<&'static str, f64> {
    take_with_ops()
        .into_iter()
        .map(|(k, (s, _))| (k, s))
        .collect()
}

/// Takes the accumulated phase totals, seconds and operators dispatched
/// (zeros unless [`crate::op_count::start`] was called), and clears them.
pub fn take_with_ops() -> Totals {
    totals()
        .lock()
        .map(|mut m| std::mem::take(&mut *m))
        .unwrap_or_default()
}
