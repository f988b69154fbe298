//! Counts of the operators libtorch dispatches (`bench-step --count-ops`),
//! through a small C++ shim (`csrc/op_count.cpp`) over libtorch's
//! RecordFunction callbacks, the profiler's mechanism. Each dispatched
//! operator costs host time (argument checks, the dispatcher, on a GPU the
//! kernel launch): at small shapes a GPU step is bound by it, and these counts
//! say how much of it a step asks for, on any device.

use crate::error::{ModelError, Result};
use std::os::raw::c_char;
use std::sync::atomic::{AtomicBool, Ordering};

extern "C" {
    fn kvd_oc_free_error(e: *mut c_char);
    fn kvd_oc_start() -> *mut c_char;
    fn kvd_oc_read(top: *mut u64, inner: *mut u64, nodes: *mut u64, node_ops: *mut u64);
    fn kvd_oc_by_name(on: i32);
    fn kvd_oc_take_names() -> *mut c_char;
}

static ON: AtomicBool = AtomicBool::new(false);

/// Operators dispatched so far (all threads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpCounts {
    /// Operators called directly by the program (not from inside another
    /// operator, nor by the backward).
    pub top_level: u64,
    /// Operators called from inside another (e.g. `mm` inside `linear`).
    pub nested: u64,
    /// Autograd nodes the backward ran.
    pub backward: u64,
    /// Operators those nodes called directly.
    pub backward_ops: u64,
}

impl OpCounts {
    /// The counts since `earlier`.
    pub fn since(self, earlier: OpCounts) -> OpCounts {
        OpCounts {
            top_level: self.top_level - earlier.top_level,
            nested: self.nested - earlier.nested,
            backward: self.backward - earlier.backward,
            backward_ops: self.backward_ops - earlier.backward_ops,
        }
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: OpCounts) {
        self.top_level += other.top_level;
        self.nested += other.nested;
        self.backward += other.backward;
        self.backward_ops += other.backward_ops;
    }

    /// Every count divided by `n` (per step of `n`), rounded down.
    pub fn per(self, n: u64) -> OpCounts {
        let n = n.max(1);
        OpCounts {
            top_level: self.top_level / n,
            nested: self.nested / n,
            backward: self.backward / n,
            backward_ops: self.backward_ops / n,
        }
    }
}

/// Starts counting for the rest of the process (a second call does nothing).
/// Counting slows every operator a little.
pub fn start() -> Result<()> {
    // SAFETY: no arguments; the shim catches libtorch's exceptions and returns
    // them as a malloc'd string, freed below.
    let e = unsafe { kvd_oc_start() };
    if !e.is_null() {
        let msg = unsafe { std::ffi::CStr::from_ptr(e) }
            .to_string_lossy()
            .into_owned();
        unsafe { kvd_oc_free_error(e) };
        return Err(ModelError::Input(format!("cannot count operators: {msg}")));
    }
    ON.store(true, Ordering::Relaxed);
    Ok(())
}

/// Whether [`start`] was called.
pub fn active() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The counts so far (zeros before [`start`]).
pub fn read() -> OpCounts {
    let (mut top, mut inner, mut nodes, mut node_ops) = (0u64, 0u64, 0u64, 0u64);
    // SAFETY: four valid out-pointers; the shim only loads atomics.
    unsafe { kvd_oc_read(&mut top, &mut inner, &mut nodes, &mut node_ops) };
    OpCounts {
        top_level: top,
        nested: inner,
        backward: nodes,
        backward_ops: node_ops,
    }
}

/// Counts top-level operators and backward nodes by name too (from now on,
/// with `on`), for [`take_names`]; slower (a lock per operator).
pub fn count_names(on: bool) {
    // SAFETY: a flag store in the shim.
    unsafe { kvd_oc_by_name(i32::from(on)) }
}

/// The counts by name since the last call (or since [`count_names`]), most
/// frequent first, and clears them.
pub fn take_names() -> Vec<(String, u64)> {
    // SAFETY: the shim returns a malloc'd NUL-terminated string (or null when
    // out of memory), freed here.
    let p = unsafe { kvd_oc_take_names() };
    if p.is_null() {
        return Vec::new();
    }
    let text = unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned();
    unsafe { kvd_oc_free_error(p) };
    let mut out: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let (name, n) = l.rsplit_once('\t')?;
            Some((name.to_string(), n.parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn counts_the_operators_a_computation_dispatches() {
        start().unwrap();
        assert!(active());
        // Other tests of this binary may run operators on other threads at the
        // same time: compare lower bounds of fresh counts only.
        let before = read();
        let x = Tensor::ones([4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = (&x * 2.0).sum(Kind::Float);
        y.backward();
        let d = read().since(before);
        // ones, mul, sum (and set_requires_grad's own), and the backward's
        // nodes (sum's, mul's, the gradient's accumulation) and their operators.
        assert!(d.top_level >= 3, "{d:?}");
        assert!(d.backward >= 3, "{d:?}");
        assert!(d.backward_ops >= 2, "{d:?}");
        let before = read();
        for _ in 0..100 {
            let _ = Tensor::zeros([2], (Kind::Float, Device::Cpu)) + 1.0;
        }
        assert!(read().since(before).top_level >= 200);
        // By name: the additions are there, at least 100 of them.
        count_names(true);
        let _ = take_names();
        for _ in 0..100 {
            let _ = Tensor::zeros([2], (Kind::Float, Device::Cpu)) + 1.0;
        }
        count_names(false);
        let names = take_names();
        let add = names.iter().find(|(n, _)| n == "aten::add").map(|x| x.1);
        assert!(add.unwrap_or(0) >= 100, "{names:?}");
    }
}
