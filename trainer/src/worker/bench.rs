//! All-reduce timing inside a real membership (`kv-distill worker
//! --bench-allreduce`): the collective on flat float32 buffers of given
//! sizes, and the bucketed gradient all-reduce of a real adaptor (packing and
//! unpacking included). Bus bandwidth as nccl-tests defines it:
//! `2 (n - 1) / n * bytes / time`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, FlatGrads, DEFAULT_BUCKET_ELEMS};
use crate::distill::Adaptor;
use crate::error::{ModelError, Result};

const WARMUP: usize = 5;
const ITERS: usize = 20;

fn bus_bw(bytes: usize, world: usize, seconds: f64) -> f64 {
    2.0 * (world as f64 - 1.0) / world as f64 * bytes as f64 / seconds / 1e9
}

/// Times the collective and writes one JSON line per case (rank 0) to `out`.
pub fn allreduce(
    coll: &mut dyn Collective,
    adaptor: &Adaptor,
    sizes: &[usize],
    out: &Path,
) -> Result<()> {
    let vars = adaptor.trainable();
    let device = vars.first().map_or(Device::Cpu, Tensor::device);
    let world = coll.world_size();
    let mut rows = Vec::new();
    for &n in sizes {
        let mut buf = Tensor::f_ones([n as i64], (Kind::Float, device))?;
        for _ in 0..WARMUP {
            coll.all_reduce_sum(&mut buf)?;
        }
        crate::device::synchronize(device);
        let t0 = Instant::now();
        for _ in 0..ITERS {
            coll.all_reduce_sum(&mut buf)?;
        }
        crate::device::synchronize(device);
        let s = t0.elapsed().as_secs_f64() / ITERS as f64;
        rows.push(serde_json::json!({
            "case": "flat", "elems": n, "bytes": n * 4, "world": world,
            "backend": coll.backend(), "seconds": s, "bus_gb_s": bus_bw(n * 4, world, s),
        }));
    }
    // The real gradient path: the adaptor's gradients in their flat buffer.
    let flat = FlatGrads::new(&vars, 3)?;
    let elems: usize = vars.iter().map(Tensor::numel).sum();
    for _ in 0..WARMUP {
        flat.all_reduce(&[1.0, 0.0, 0.0], coll, DEFAULT_BUCKET_ELEMS)?;
    }
    crate::device::synchronize(device);
    let t0 = Instant::now();
    for _ in 0..ITERS {
        flat.all_reduce(&[1.0, 0.0, 0.0], coll, DEFAULT_BUCKET_ELEMS)?;
    }
    crate::device::synchronize(device);
    let s = t0.elapsed().as_secs_f64() / ITERS as f64;
    rows.push(serde_json::json!({
        "case": "adaptor_gradients", "elems": elems, "bytes": elems * 4, "tensors": vars.len(),
        "world": world, "backend": coll.backend(), "seconds": s,
        "bus_gb_s": bus_bw(elems * 4, world, s),
    }));
    if coll.rank() == 0 {
        let mut f = std::fs::File::create(out).map_err(|source| ModelError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        for r in &rows {
            writeln!(f, "{r}").map_err(|source| ModelError::Io {
                path: out.to_path_buf(),
                source,
            })?;
        }
    }
    for r in &rows {
        tracing::info!(rank = coll.rank(), result = %r, "all-reduce benchmark");
    }
    Ok(())
}
