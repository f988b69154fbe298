//! Collectives among the ranks of a job: the [`Collective`] trait (NCCL on
//! GPUs, a TCP star on CPUs, [`Single`] for one process) and the bucketed
//! gradient all-reduce. Below both the method (whose optimizer step
//! all-reduces through it) and the worker (which builds the communicator).

pub mod nccl;
pub mod tcp;

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
    /// The communicator was aborted: the coordinator ordered a rebuild or a stop.
    #[error("{backend} communicator aborted by the coordinator's order (rebuild or stop)")]
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

/// Sums a few host values over the ranks of `coll` (through a float32 tensor
/// on `device`, so integers are exact up to 2^24); with one rank, `values`.
pub fn all_reduce_values(
    coll: &mut dyn Collective,
    values: &[f64],
    device: tch::Device,
) -> Result<Vec<f64>, CollectiveError> {
    if coll.world_size() == 1 {
        return Ok(values.to_vec());
    }
    let backend = coll.backend();
    let transport = |e: tch::TchError| CollectiveError::Transport {
        backend,
        msg: e.to_string(),
    };
    let host: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let mut buf = Tensor::from_slice(&host)
        .f_to_device(device)
        .map_err(transport)?;
    coll.all_reduce_sum(&mut buf)?;
    let back = buf.f_to_device(tch::Device::Cpu).map_err(transport)?;
    let sums = Vec::<f32>::try_from(&back).map_err(transport)?;
    Ok(sums.into_iter().map(f64::from).collect())
}

/// Default bucket size of the gradient all-reduce: 4 Mi float32 (16 MiB).
pub const DEFAULT_BUCKET_ELEMS: usize = 4 << 20;

/// The gradients of a set of variables as views of one flat float32 buffer,
/// followed by a few slots for per-step scalars (loss, counts). Autograd
/// accumulates into the existing gradient in place, so backward writes
/// straight into the buffer: the all-reduce needs no packing or unpacking,
/// and zeroing, scaling and the norm are one kernel each.
pub struct FlatGrads {
    vars: Vec<Tensor>,
    flat: Tensor,
    elems: i64,
    tail: i64,
    offsets: Vec<i64>,
}

impl FlatGrads {
    /// Points the gradients of `vars` (float32) into a new flat buffer with
    /// `tail` extra slots; the gradients start at zero.
    pub fn new(vars: &[Tensor], tail: usize) -> crate::error::Result<Self> {
        let device = vars.first().map_or(tch::Device::Cpu, Tensor::device);
        let missing: Vec<&Tensor> = vars.iter().filter(|v| !v.grad().defined()).collect();
        if !missing.is_empty() {
            let mut z = Tensor::zeros([], (Kind::Float, device));
            for v in missing {
                z += v.sum(Kind::Float) * 0.0;
            }
            z.f_backward()?;
        }
        let elems: i64 = vars.iter().map(|v| v.numel() as i64).sum();
        let flat = Tensor::f_zeros([elems + tail as i64], (Kind::Float, device))?;
        let mut offsets = Vec::with_capacity(vars.len());
        let mut off = 0i64;
        for v in vars {
            offsets.push(off);
            off += v.numel() as i64;
        }
        let me = Self {
            vars: vars.iter().map(Tensor::shallow_clone).collect(),
            flat,
            elems,
            tail: tail as i64,
            offsets,
        };
        me.repoint()?;
        Ok(me)
    }

    /// Makes every gradient a view of its slot again if autograd replaced it
    /// (keeping its values). Returns how many had moved.
    fn repoint(&self) -> crate::error::Result<usize> {
        let base = self.flat.data_ptr() as usize;
        let mut moved = 0;
        tch::no_grad(|| -> crate::error::Result<()> {
            for (v, &off) in self.vars.iter().zip(&self.offsets) {
                let mut g = v.grad();
                if g.data_ptr() as usize == base + off as usize * 4 && g.is_contiguous() {
                    continue;
                }
                moved += 1;
                let size = g.size();
                let mut slot = self.flat.f_narrow(0, off, v.numel() as i64)?;
                slot.f_copy_(&g.f_reshape([-1])?)?;
                let _ = g.f_set_source_tensor_storage_offset_(
                    &self.flat,
                    off,
                    size.as_slice(),
                    crate::distill::adamw::contiguous_strides(&size).as_slice(),
                )?;
            }
            Ok(())
        })?;
        Ok(moved)
    }

    /// All gradients as one 1-D view.
    pub fn grads(&self) -> Tensor {
        self.flat.narrow(0, 0, self.elems)
    }

    /// A copy of the gradients, for [`FlatGrads::restore`] (a micro-batch
    /// that failed part-way must not leave its partial sums).
    pub fn snapshot(&self) -> crate::error::Result<Tensor> {
        self.repoint()?;
        Ok(self.grads().f_detach_copy()?)
    }

    /// Puts back the gradients of a [`FlatGrads::snapshot`].
    pub fn restore(&self, snapshot: &Tensor) -> crate::error::Result<()> {
        self.repoint()?;
        self.grads().f_copy_(snapshot)?;
        Ok(())
    }

    /// Zeroes the gradients (one kernel).
    pub fn zero(&self) -> crate::error::Result<()> {
        if self.repoint()? > 0 {
            tracing::debug!("gradients were re-pointed into the flat buffer");
        }
        let _ = self.flat.shallow_clone().f_zero_()?;
        Ok(())
    }

    /// Sums the gradients and `stats` (at most `tail` scalars) over all ranks,
    /// in buckets of about `bucket_elems`; returns the summed scalars. With
    /// one rank nothing moves.
    pub fn all_reduce(
        &self,
        stats: &[f64],
        coll: &mut dyn Collective,
        bucket_elems: usize,
    ) -> crate::error::Result<Vec<f64>> {
        if coll.world_size() == 1 {
            return Ok(stats.to_vec());
        }
        if stats.len() as i64 > self.tail {
            return Err(crate::error::ModelError::Input(format!(
                "{} step scalars for {} slots",
                stats.len(),
                self.tail
            )));
        }
        if self.repoint()? > 0 {
            tracing::debug!("gradients were re-pointed into the flat buffer");
        }
        let n = stats.len() as i64;
        tch::no_grad(|| -> crate::error::Result<Vec<f64>> {
            let s: Vec<f32> = stats.iter().map(|&x| x as f32).collect();
            let mut tail = self.flat.f_narrow(0, self.elems, n)?;
            tail.f_copy_(&Tensor::from_slice(&s).f_to_device(self.flat.device())?)?;
            let total = self.elems + n;
            let step = bucket_elems.max(1) as i64;
            let mut off = 0i64;
            while off < total {
                let len = step.min(total - off);
                let mut chunk = self.flat.f_narrow(0, off, len)?;
                coll.all_reduce_sum(&mut chunk)?;
                off += len;
            }
            let tail = self
                .flat
                .f_narrow(0, self.elems, n)?
                .f_to_device(tch::Device::Cpu)?;
            Ok(Vec::<f32>::try_from(&tail)?
                .into_iter()
                .map(f64::from)
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_writes_into_the_flat_buffer() {
        let a = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let flat = FlatGrads::new(&[a.shallow_clone(), b.shallow_clone()], 2).unwrap();
        let run = || ((&a * 2.0).sum(Kind::Float) + (&b * 3.0).sum(Kind::Float)).backward();
        run();
        run();
        let want: Vec<f32> = [vec![4.0; 6], vec![6.0; 4]].concat();
        assert_eq!(Vec::<f32>::try_from(&flat.grads()).unwrap(), want);
        // The parameters' own gradients are views of the buffer.
        assert_eq!(a.grad().data_ptr(), flat.grads().data_ptr());
        flat.zero().unwrap();
        assert_eq!(a.grad().sum(Kind::Float).double_value(&[]), 0.0);
        run();
        assert_eq!(
            Vec::<f32>::try_from(&b.grad().reshape([-1])).unwrap(),
            vec![3.0; 4]
        );
        assert_eq!(
            flat.all_reduce(&[1.0, 2.0], &mut Single, 4).unwrap(),
            vec![1.0, 2.0]
        );
    }
}
