//! CUDA graphs over libtorch work: capture a sequence of tensor operations
//! once, then replay it with one launch. tch binds neither graphs nor streams,
//! so this wraps a small C++ shim (`csrc/cuda_graph.cpp`) over
//! `at::cuda::CUDAGraph` and libtorch's stream pool. A replay reads and writes
//! the tensors the capture used (its static inputs and outputs), so callers
//! copy new inputs into those tensors before each replay.
//!
//! Built only where libtorch has CUDA and the CUDA headers were found
//! (`kvd_cuda_graphs`); elsewhere every call returns an error.

use crate::error::{ModelError, Result};
use std::os::raw::{c_char, c_int, c_void};

/// Declares the shim's functions; without the shim, stand-ins with the same
/// signatures that are never reached ([`call`] refuses first).
macro_rules! shim {
    ($(fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)*) => {
        #[cfg(kvd_cuda_graphs)]
        extern "C" {
            $(fn $name($($arg: $ty),*) $(-> $ret)?;)*
        }
        $(
            #[cfg(not(kvd_cuda_graphs))]
            #[allow(unused_variables)]
            unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                unreachable!("the CUDA graph shim is not built")
            }
        )*
    };
}

shim! {
    fn kvd_cg_free_error(e: *mut c_char);
    fn kvd_cg_stream_new(device: c_int, out: *mut *mut c_void) -> *mut c_char;
    fn kvd_cg_stream_free(s: *mut c_void);
    fn kvd_cg_stream_enter(side: *mut c_void, prev: *mut *mut c_void) -> *mut c_char;
    fn kvd_cg_stream_exit(side: *mut c_void, prev: *mut c_void) -> *mut c_char;
    fn kvd_cg_graph_new(out: *mut *mut c_void) -> *mut c_char;
    fn kvd_cg_graph_free(g: *mut c_void);
    fn kvd_cg_capture_begin(g: *mut c_void) -> *mut c_char;
    fn kvd_cg_capture_end(g: *mut c_void) -> *mut c_char;
    fn kvd_cg_replay(g: *mut c_void) -> *mut c_char;
    fn kvd_cg_empty_cache() -> *mut c_char;
}

/// Whether this build can capture CUDA graphs.
pub fn available() -> bool {
    cfg!(kvd_cuda_graphs)
}

/// Makes one shim call `f` (refused when the shim is not built) and turns
/// its error, a malloc'd C string or null, into a `Result`.
fn call(what: &str, f: impl FnOnce() -> *mut c_char) -> Result<()> {
    if !available() {
        return Err(ModelError::Input(
            "CUDA graphs are not available: kv-distill was built without libtorch CUDA or the CUDA headers"
                .into(),
        ));
    }
    let e = f();
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from malloc,
    // owned by us until kvd_cg_free_error.
    let msg = unsafe { std::ffi::CStr::from_ptr(e) }
        .to_string_lossy()
        .into_owned();
    unsafe { kvd_cg_free_error(e) };
    Err(ModelError::Input(format!("CUDA graph {what}: {msg}")))
}

/// Returns libtorch's cached but unused device memory to the driver (before a
/// capture, so the graph's private pool does not add to it).
pub fn empty_cache() -> Result<()> {
    // SAFETY: no arguments; the shim catches libtorch's exceptions.
    call("empty cache", || unsafe { kvd_cg_empty_cache() })
}

/// A CUDA stream from libtorch's pool, on which graphs are captured (the
/// default stream cannot be captured).
pub struct SideStream {
    ptr: *mut c_void,
}

impl SideStream {
    /// A stream on CUDA device `device`.
    pub fn new(device: usize) -> Result<SideStream> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: the shim writes a new stream handle into `ptr` on success.
        call("stream", || unsafe {
            kvd_cg_stream_new(device as c_int, &mut ptr)
        })?;
        Ok(SideStream { ptr })
    }

    /// Runs `f` with this stream as the thread's current stream, ordered
    /// after the work already queued on the previous one; work queued
    /// afterwards on the previous stream waits for `f`'s.
    pub fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut prev = std::ptr::null_mut();
        // SAFETY: `self.ptr` is a live stream; `prev` receives a handle that
        // kvd_cg_stream_exit frees.
        call("stream", || unsafe {
            kvd_cg_stream_enter(self.ptr, &mut prev)
        })?;
        let out = f();
        // SAFETY: `prev` came from kvd_cg_stream_enter above.
        let exit = call("stream", || unsafe { kvd_cg_stream_exit(self.ptr, prev) });
        let out = out?;
        exit?;
        Ok(out)
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from kvd_cg_stream_new and is freed once.
        unsafe { kvd_cg_stream_free(self.ptr) }
    }
}

/// A captured CUDA graph, with its private memory pool.
pub struct CudaGraph {
    ptr: *mut c_void,
}

impl CudaGraph {
    /// Captures the device work `f` queues on the current stream (which must
    /// not be the default stream: run inside [`SideStream::run`]). Nothing
    /// runs; the tensors `f` allocates live in the graph's pool and are
    /// rewritten by every replay. `f` must not wait for the device or copy
    /// from the host.
    pub fn capture<T>(f: impl FnOnce() -> Result<T>) -> Result<(CudaGraph, T)> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: the shim writes a new graph handle into `ptr` on success.
        call("creation", || unsafe { kvd_cg_graph_new(&mut ptr) })?;
        let graph = CudaGraph { ptr };
        // SAFETY: `graph.ptr` is live.
        call("capture", || unsafe { kvd_cg_capture_begin(graph.ptr) })?;
        let out = f();
        // The capture ends even when `f` failed, so the stream leaves capture mode.
        // SAFETY: a capture was begun on `graph.ptr`.
        let end = call("capture", || unsafe { kvd_cg_capture_end(graph.ptr) });
        let out = out?;
        end?;
        Ok((graph, out))
    }

    /// Launches the captured work on the current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `self.ptr` is a captured graph.
        call("replay", || unsafe { kvd_cg_replay(self.ptr) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from kvd_cg_graph_new and is freed once.
        unsafe { kvd_cg_graph_free(self.ptr) }
    }
}

// SAFETY: the handles are plain heap objects of libtorch; the graph and stream
// may be used from any thread (one at a time: `&mut`/ownership rules apply).
unsafe impl Send for SideStream {}
unsafe impl Send for CudaGraph {}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CudaGraph")
    }
}

impl std::fmt::Debug for SideStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SideStream")
    }
}
