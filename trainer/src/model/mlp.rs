//! Gated MLP (SwiGLU for Llama/Qwen2, GeGLU for Gemma).

use super::hooks::{Hooks, Proj};
use super::linear::Linear;
use crate::config::Activation;
use tch::Tensor;

/// `down(act(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
    /// Gate activation.
    pub activation: Activation,
}

impl Mlp {
    /// Applies the MLP of layer `layer` to `x` `[.., hidden]`.
    pub fn forward(&self, x: &Tensor, layer: usize, hooks: &dyn Hooks) -> Tensor {
        // `[batch * seq, hidden]` through the projections (one matrix product
        // each, no reshape around it), `[batch, seq, hidden]` out.
        let size = x.size();
        let x = x.reshape([-1, size[size.len() - 1]]);
        let proj =
            |p: &Linear, which: Proj, input: &Tensor| p.forward_hooked(input, layer, which, hooks);
        let gate = proj(&self.gate_proj, Proj::Gate, &x);
        let gate = match self.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        };
        proj(
            &self.down_proj,
            Proj::Down,
            &(gate * proj(&self.up_proj, Proj::Up, &x)),
        )
        .view(size.as_slice())
    }
}
