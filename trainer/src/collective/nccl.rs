//! The GPU collective: NCCL through cudarc (loaded at run time, so building
//! needs no CUDA), one process per GPU, in place on the tensors' device
//! memory, on the CUDA null stream so that it runs after torch's kernels on
//! the default stream. While the all-reduce runs, the host polls the stream
//! and aborts the communicator when a membership rebuild is ordered or the
//! timeout passes, so a dead peer never hangs a worker.
//!
//! On a machine with both a system NCCL and torch's, `libnccl.so` must
//! resolve to torch's copy (scripts/gpu_env.sh, the container entrypoint):
//! two copies in one process fail with "corrupted comm object".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::nccl::sys as nccl;
use tch::{Kind, Tensor};

use super::{Collective, CollectiveError};

const BACKEND: &str = "nccl";
/// How long the host spins on the stream before sleeping between polls.
const SPIN: Duration = Duration::from_millis(5);

fn init_err(msg: impl Into<String>) -> CollectiveError {
    CollectiveError::Init {
        backend: BACKEND,
        msg: msg.into(),
    }
}

/// Runs `f`, turning a panic of cudarc's loader (no libnccl/libcuda) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, CollectiveError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| init_err(format!("{what}: cannot load NCCL or the CUDA driver")))
}

/// A fresh NCCL unique id (rank 0 of each epoch makes one).
pub fn unique_id() -> Result<Vec<u8>, CollectiveError> {
    let id = guarded("ncclGetUniqueId", cudarc::nccl::result::get_uniqueid)?
        .map_err(|e| init_err(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator of one membership epoch.
pub struct Nccl {
    comm: nccl::ncclComm_t,
    rank: usize,
    world: usize,
    abort: Arc<AtomicBool>,
    timeout: Duration,
    aborted: bool,
}

// The communicator is used from one thread at a time (the training thread).
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the communicator named by `id` (rank 0's unique id) as `rank` of
    /// `world`, on the current CUDA device.
    pub fn connect(
        id: &[u8],
        rank: usize,
        world: usize,
        abort: Arc<AtomicBool>,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if id.len() != kvd_proto::NCCL_UNIQUE_ID_BYTES {
            return Err(init_err(format!("unique id of {} bytes", id.len())));
        }
        if id.starts_with(b"kvd-tcp:") {
            return Err(init_err(
                "rank 0 runs the TCP (CPU) collective; every rank must use the same device kind",
            ));
        }
        let mut uid = nccl::ncclUniqueId { internal: [0; 128] };
        for (d, &s) in uid.internal.iter_mut().zip(id) {
            *d = s as ::core::ffi::c_char;
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out pointer; the id is 128 bytes.
        guarded("ncclCommInitRank", || unsafe {
            cudarc::nccl::result::comm_init_rank(&mut comm, world as i32, uid, rank as i32)
        })?
        .map_err(|e| init_err(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")))?;
        Ok(Self {
            comm,
            rank,
            world,
            abort,
            timeout,
            aborted: false,
        })
    }

    fn abort_comm(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: the communicator is valid until dropped.
            let _ = unsafe { cudarc::nccl::result::comm_abort(self.comm) };
        }
    }

    /// Waits for the null stream, aborting on a rebuild order or timeout.
    fn wait(&mut self) -> Result<(), CollectiveError> {
        use cudarc::driver::sys::{cuStreamQuery, CUresult};
        let started = Instant::now();
        let deadline = started + self.timeout;
        loop {
            // SAFETY: querying the legacy null stream.
            match unsafe { cuStreamQuery(std::ptr::null_mut()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(CollectiveError::Transport {
                        backend: BACKEND,
                        msg: format!("CUDA stream error {other:?}"),
                    })
                }
            }
            let mut err = nccl::ncclResult_t::ncclSuccess;
            // SAFETY: valid communicator and out pointer.
            unsafe { nccl::ncclCommGetAsyncError(self.comm, &mut err) };
            if err != nccl::ncclResult_t::ncclSuccess && err != nccl::ncclResult_t::ncclInProgress {
                self.abort_comm();
                return Err(CollectiveError::Transport {
                    backend: BACKEND,
                    msg: format!("asynchronous NCCL error {err:?} (a peer failed)"),
                });
            }
            if self.abort.load(Ordering::SeqCst) {
                self.abort_comm();
                return Err(CollectiveError::Aborted { backend: BACKEND });
            }
            if Instant::now() > deadline {
                self.abort_comm();
                return Err(CollectiveError::Timeout {
                    backend: BACKEND,
                    seconds: self.timeout.as_secs(),
                });
            }
            // Spin first (small all-reduces finish in tens of microseconds),
            // then back off so a long wait does not burn a core.
            if started.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<(), CollectiveError> {
        if self.aborted {
            return Err(CollectiveError::Aborted { backend: BACKEND });
        }
        if buf.kind() != Kind::Float || !buf.is_contiguous() || !buf.device().is_cuda() {
            return Err(CollectiveError::Transport {
                backend: BACKEND,
                msg: "NCCL all-reduce needs a contiguous float32 CUDA tensor".into(),
            });
        }
        let ptr = buf.data_ptr();
        // SAFETY: in place on a live contiguous CUDA tensor of numel floats,
        // on the null stream (ordered after torch's default-stream kernels).
        unsafe {
            cudarc::nccl::result::all_reduce(
                ptr,
                ptr,
                buf.numel(),
                nccl::ncclDataType_t::ncclFloat32,
                nccl::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| CollectiveError::Transport {
            backend: BACKEND,
            msg: format!("ncclAllReduce: {e:?}"),
        })?;
        self.wait()
    }

    fn backend(&self) -> &'static str {
        BACKEND
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator is valid and no longer used.
        unsafe {
            if self.aborted {
                return;
            }
            let _ = cudarc::nccl::result::comm_destroy(self.comm);
        }
    }
}
