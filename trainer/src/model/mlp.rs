//! Gated MLP (SwiGLU for Llama/Qwen2, GeGLU for Gemma).

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
    /// Applies the MLP to `x` `[.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x);
        let gate = match self.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        };
        self.down_proj.forward(&(gate * self.up_proj.forward(x)))
    }
}
