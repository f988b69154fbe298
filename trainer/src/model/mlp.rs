//! Gated MLP (SwiGLU for Llama/Qwen2, GeGLU for Gemma).

use super::hooks::{Hooks, Proj};
use super::linear::{Linear, Stacked};
use crate::config::Activation;
use crate::error::{ModelError, Result};
use tch::Tensor;

/// `down(act(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    /// Gate and up projections, stacked (parts 0 and 1).
    pub gate_up: Stacked,
    /// Down projection.
    pub down_proj: Linear,
    /// Gate activation.
    pub activation: Activation,
}

impl Mlp {
    /// Applies the MLP of layer `layer` to `x` `[.., hidden]`.
    pub fn forward(&self, x: &Tensor, layer: usize, hooks: &dyn Hooks) -> Result<Tensor> {
        // `[batch * seq, hidden]` through the projections (one matrix product
        // for gate and up together, no reshape around it), `[batch, seq,
        // hidden]` out.
        let size = x.size();
        let x = x.f_reshape([-1, size[size.len() - 1]])?;
        let [gate, up]: [Tensor; 2] = self
            .gate_up
            .forward(&x)?
            .try_into()
            .map_err(|_| ModelError::Input("mlp: gate and up expected".into()))?;
        let gate = hooks.adjust_linear(layer, Proj::Gate, &x, gate);
        let up = hooks.adjust_linear(layer, Proj::Up, &x, up);
        let gate = match self.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        };
        Ok(self
            .down_proj
            .forward_hooked(&(gate * up), layer, Proj::Down, hooks)
            .f_view(size.as_slice())?)
    }
}
