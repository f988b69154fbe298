//! The training step's device work as CUDA graphs. At batch 1 the step is
//! bound by host launches (thousands of small kernels); a graph captured once
//! per batch shape replays all of them with one launch. What runs before the
//! graph (the teacher's first layers, the scorer, and the selection, which
//! reads the scores on the host) stays eager.
//!
//! The first batch of a shape runs eagerly on a side stream (warming
//! libtorch's per-stream state, and giving that step's result), then the same
//! work is captured. Later batches of that shape copy their inputs into the
//! captured ones and replay. Gradients accumulate in place into the trainer's
//! flat gradient buffer, whose address never changes.

use super::loss::{KlOutput, KlValues};
use super::step::{checked, StepInputs, StudentPass};
use crate::cuda_graph::{CudaGraph, SideStream};
use crate::error::{ModelError, Result};
use tch::Device;

/// Captured steps, one per batch shape (the most recent `capacity` shapes).
pub struct StepGraphs {
    stream: SideStream,
    captured: Vec<Captured>,
    capacity: usize,
    replays: u64,
}

/// One captured step: its graph, the inputs it reads and the loss it writes.
struct Captured {
    key: Vec<i64>,
    graph: CudaGraph,
    inputs: StepInputs,
    kl: KlOutput,
}

impl std::fmt::Debug for StepGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraphs")
            .field("shapes", &self.captured.len())
            .field("replays", &self.replays)
            .finish()
    }
}

impl StepGraphs {
    /// Graphs on `device` (CUDA only), keeping at most `capacity` shapes
    /// (each holds its own activation memory).
    pub fn new(device: Device, capacity: usize) -> Result<StepGraphs> {
        let Device::Cuda(i) = device else {
            return Err(ModelError::Input(format!(
                "CUDA graphs need a CUDA device, not {device:?}"
            )));
        };
        if super::phases::enabled() {
            return Err(ModelError::Input(
                "CUDA graphs cannot be captured with phase timing on (--step-phases synchronizes inside the step)"
                    .into(),
            ));
        }
        Ok(StepGraphs {
            stream: SideStream::new(i)?,
            captured: Vec::new(),
            capacity: capacity.max(1),
            replays: 0,
        })
    }

    /// Batch shapes captured so far (at most the capacity).
    pub fn shapes(&self) -> usize {
        self.captured.len()
    }

    /// Steps that replayed a graph.
    pub fn replays(&self) -> u64 {
        self.replays
    }

    /// Runs `pass` on `inputs`: a replay when their shape was captured, else
    /// an eager run followed by a capture. Returns the (checked) loss.
    pub fn run(&mut self, pass: &StudentPass, inputs: StepInputs) -> Result<KlValues> {
        let key = shape_key(pass, &inputs);
        if let Some(i) = self.captured.iter().position(|c| c.key == key) {
            let c = self.captured.remove(i);
            let v = replay(&c, &inputs);
            // Most recently used last.
            self.captured.push(c);
            self.replays += 1;
            return v;
        }
        let (kl, graph, captured_kl) = self.stream.run(|| {
            let kl = pass.run(&inputs, false, false)?;
            // The eager run's activations are free now; without this, the
            // graph's pool would come on top of the memory they left cached.
            crate::cuda_graph::empty_cache()?;
            let (graph, captured_kl) = CudaGraph::capture(|| pass.run(&inputs, false, false))?;
            Ok((kl, graph, captured_kl))
        })?;
        if self.captured.len() == self.capacity {
            self.captured.remove(0);
        }
        self.captured.push(Captured {
            key,
            graph,
            inputs,
            kl: captured_kl,
        });
        checked(&kl)
    }
}

/// Copies `inputs` into the captured step's and replays it.
fn replay(c: &Captured, inputs: &StepInputs) -> Result<KlValues> {
    for (dst, src) in c.inputs.tensors().into_iter().zip(inputs.tensors()) {
        dst.shallow_clone().f_copy_(src)?;
    }
    c.graph.replay()?;
    checked(&c.kl)
}

/// What a captured step depends on besides its inputs' values: their shapes
/// and kinds, the gradient scale, training or not, and the adaptor's address.
fn shape_key(pass: &StudentPass, inputs: &StepInputs) -> Vec<i64> {
    let mut key = vec![
        pass.grad_scale.kl.to_bits() as i64,
        pass.grad_scale.select.to_bits() as i64,
        pass.backward as i64,
        pass.adaptor as *const _ as i64,
    ];
    for t in inputs.tensors() {
        key.push(t.kind() as i64);
        key.push(t.dim() as i64);
        key.extend(t.size());
    }
    key
}
