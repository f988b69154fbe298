//! Where a stretch of work's time goes, by kernel: libtorch's Kineto profiler
//! (what `torch.profiler` uses) through a small C++ shim
//! (`csrc/kernel_profile.cpp`), over the CPU's operators and, on a CUDA
//! device, the GPU's kernels, copies and sets, summed by name. The table
//! `bench-step --profile` writes is the one `bench/kvdistill_ref.py
//! --profile` writes for the PyTorch reference, so the two steps' kernels
//! can be ranked side by side.

use crate::error::{ModelError, Result};
use std::fmt::Write as _;
use std::os::raw::c_char;

extern "C" {
    fn kvd_kp_free(s: *mut c_char);
    fn kvd_kp_start(cuda: i32) -> *mut c_char;
    fn kvd_kp_stop(out: *mut *mut c_char) -> *mut c_char;
}

/// Takes a malloc'd string from the shim (null: none).
fn take(s: *mut c_char) -> Option<String> {
    if s.is_null() {
        return None;
    }
    // SAFETY: a non-null string from the shim is NUL-terminated and ours
    // until kvd_kp_free.
    let text = unsafe { std::ffi::CStr::from_ptr(s) }
        .to_string_lossy()
        .into_owned();
    unsafe { kvd_kp_free(s) };
    Some(text)
}

/// Where one name's time went.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProfileRow {
    /// `cpu` (operators, inclusive of what they call) or `cuda` (kernels,
    /// copies and sets on the device).
    pub device: String,
    /// Operator or kernel name.
    pub name: String,
    /// Calls.
    pub count: u64,
    /// Total time, microseconds.
    pub total_us: f64,
}

/// A running profile; [`Profile::stop`] ends it.
#[derive(Debug)]
#[must_use = "a profile runs until stopped"]
pub struct Profile(());

impl Profile {
    /// Starts profiling the CPU's operators and, with `cuda`, the device's
    /// activity (one profile at a time per process).
    pub fn start(cuda: bool) -> Result<Profile> {
        // SAFETY: no pointers passed; the shim catches libtorch's exceptions.
        match take(unsafe { kvd_kp_start(i32::from(cuda)) }) {
            None => Ok(Profile(())),
            Some(e) => Err(ModelError::Input(format!("starting the profiler: {e}"))),
        }
    }

    /// Stops and returns the time per (device, name), most first.
    pub fn stop(self) -> Result<Vec<ProfileRow>> {
        let mut out = std::ptr::null_mut();
        // SAFETY: `out` receives a malloc'd string or stays null.
        if let Some(e) = take(unsafe { kvd_kp_stop(&mut out) }) {
            return Err(ModelError::Input(format!("stopping the profiler: {e}")));
        }
        let text = take(out).unwrap_or_default();
        let mut rows = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let [device, name, count, ns] = f[..] else {
                return Err(ModelError::Input(format!("profiler line {line:?}")));
            };
            let parse = |s: &str| {
                s.parse::<u64>()
                    .map_err(|_| ModelError::Input(format!("profiler line {line:?}")))
            };
            rows.push(ProfileRow {
                device: device.into(),
                name: name.into(),
                count: parse(count)?,
                total_us: parse(ns)? as f64 / 1e3,
            });
        }
        rows.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        Ok(rows)
    }
}

/// A Markdown table of `device`'s rows (the first `limit`), per step of
/// `steps`: calls, milliseconds, and share of the device's summed time
/// (`cuda`) or of `wall_us`, the profiled stretch's wall time (`cpu`, whose
/// operator times are inclusive: nested calls count in both).
pub fn table(
    rows: &[ProfileRow],
    device: &str,
    steps: usize,
    limit: usize,
    wall_us: f64,
) -> String {
    let steps = steps.max(1) as f64;
    let mine: Vec<&ProfileRow> = rows.iter().filter(|r| r.device == device).collect();
    let summed: f64 = mine.iter().map(|r| r.total_us).sum();
    let (whole, what) = match device {
        "cpu" => (
            wall_us,
            "of the wall time; inclusive: nested calls count in both",
        ),
        _ => (summed, "of the summed device time"),
    };
    let mut out = format!(
        "{device}: {} names, {:.3} ms summed per step; share {what}\n\n\
         | name | calls per step | ms per step | share |\n|---|---|---|---|\n",
        mine.len(),
        summed / 1e3 / steps,
    );
    for r in mine.iter().take(limit) {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.3} | {:.1}% |",
            r.name.replace('|', "\\|"),
            r.count as f64 / steps,
            r.total_us / 1e3 / steps,
            100.0 * r.total_us / whole.max(f64::MIN_POSITIVE)
        );
    }
    out
}
