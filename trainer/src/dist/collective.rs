//! The collective interface and the bucketed gradient all-reduce.

use tch::{Kind, Tensor};

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer closed its connection or the transport failed.
    #[error("{backend} all-reduce: {msg}")]
    Transport {
        /// `tcp` or `nccl`.
        backend: &'static str,
        /// What happened.
        msg: String,
    },
    /// The communicator was aborted (a membership rebuild was ordered).
    #[error("{backend} communicator aborted for a membership rebuild")]
    Aborted {
        /// `tcp` or `nccl`.
        backend: &'static str,
    },
    /// No peer answered within the collective timeout.
    #[error("{backend} all-reduce timed out after {seconds} s (a peer is stuck or gone)")]
    Timeout {
        /// `tcp` or `nccl`.
        backend: &'static str,
        /// The timeout.
        seconds: u64,
    },
    /// The communicator could not be created.
    #[error("{backend} init: {msg}")]
    Init {
        /// `tcp` or `nccl`.
        backend: &'static str,
        /// What happened.
        msg: String,
    },
}

/// An all-reduce among the ranks of one membership epoch. Every rank must call
/// the same collectives in the same order with the same sizes.
pub trait Collective: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Sums the contiguous 1-D float32 tensor `buf` over all ranks, in place.
    /// The result is identical on every rank (the TCP star sums in rank order,
    /// so CPU runs are bit-reproducible).
    fn all_reduce_sum(&mut self, buf: &mut Tensor) -> Result<(), CollectiveError>;
    /// `nccl`, `tcp` or `single`.
    fn backend(&self) -> &'static str;
}

/// The world of one process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn backend(&self) -> &'static str {
        "single"
    }
}

/// Default bucket size of the gradient all-reduce: 4 Mi float32 (16 MiB).
pub const DEFAULT_BUCKET_ELEMS: usize = 4 << 20;

/// Sums the gradients of `vars` (all defined, float32) and the scalars `stats`
/// over all ranks. Gradients are flattened into buckets of about
/// `bucket_elems` elements (one collective per bucket, in `vars` order, which
/// must be the same on every rank); the scalars ride in the last bucket.
/// Returns the summed scalars. With one rank nothing moves.
pub fn reduce_gradients(
    vars: &[Tensor],
    stats: &[f64],
    coll: &mut dyn Collective,
    bucket_elems: usize,
) -> crate::error::Result<Vec<f64>> {
    if coll.world_size() == 1 {
        return Ok(stats.to_vec());
    }
    let grads: Vec<Tensor> = vars.iter().map(Tensor::grad).collect();
    let device = vars.first().map_or(tch::Device::Cpu, Tensor::device);
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new()];
    let mut filled = 0usize;
    for (i, g) in grads.iter().enumerate() {
        let n = g.numel();
        if filled > 0 && filled + n > bucket_elems {
            buckets.push(Vec::new());
            filled = 0;
        }
        buckets.last_mut().expect("one bucket").push(i);
        filled += n;
    }
    let last = buckets.len() - 1;
    let mut out = stats.to_vec();
    tch::no_grad(|| -> crate::error::Result<()> {
        for (b, members) in buckets.iter().enumerate() {
            let mut parts: Vec<Tensor> = members.iter().map(|&i| grads[i].view(-1)).collect();
            if b == last {
                let s: Vec<f32> = stats.iter().map(|&x| x as f32).collect();
                parts.push(Tensor::from_slice(&s).to_device(device));
            }
            let mut flat = Tensor::f_cat(&parts, 0)?.f_to_kind(Kind::Float)?;
            coll.all_reduce_sum(&mut flat)?;
            let mut off = 0i64;
            for &i in members {
                let n = grads[i].numel() as i64;
                let mut g = grads[i].shallow_clone();
                g.f_copy_(&flat.f_narrow(0, off, n)?.f_view_as(&g)?)?;
                off += n;
            }
            if b == last {
                let tail = flat
                    .f_narrow(0, off, stats.len() as i64)?
                    .f_to_device(tch::Device::Cpu)?;
                let v: Vec<f32> = Vec::<f32>::try_from(&tail)?;
                out = v.into_iter().map(f64::from).collect();
            }
        }
        Ok(())
    })?;
    Ok(out)
}
