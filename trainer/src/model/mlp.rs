//! Gated MLP (SwiGLU for Llama/Qwen2, GeGLU for Gemma).

use super::hooks::{Hooks, Proj};
use super::linear::{self, Linear};
use crate::config::Activation;
use crate::error::Result;
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
    /// gate and up stacked into one projection, when fused ([`Mlp::fuse_gate_up`]);
    /// their own weights are then views of it.
    pub gate_up: Option<Linear>,
    /// Gate activation.
    pub activation: Activation,
}

impl Mlp {
    /// Applies the MLP of layer `layer` to `x` `[.., hidden]`.
    pub fn forward(&self, x: &Tensor, layer: usize, hooks: &dyn Hooks) -> Result<Tensor> {
        let proj =
            |p: &Linear, which: Proj, input: &Tensor| p.forward_hooked(input, layer, which, hooks);
        let (gate, up) = match &self.gate_up {
            Some(fused) => {
                let ff = self.up_proj.weight.size()[0];
                let mut p = linear::forward_split(
                    fused,
                    x,
                    &[ff, ff],
                    layer,
                    &[Proj::Gate, Proj::Up],
                    hooks,
                )?;
                match (p.pop(), p.pop()) {
                    (Some(up), Some(gate)) => (gate, up),
                    _ => unreachable!("split into two widths"),
                }
            }
            None => {
                let gate = proj(&self.gate_proj, Proj::Gate, x);
                (gate, proj(&self.up_proj, Proj::Up, x))
            }
        };
        let gate = match self.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        };
        Ok(proj(&self.down_proj, Proj::Down, &(gate * up)))
    }

    /// Stacks gate and up into one projection ([`Mlp::gate_up`]).
    pub fn fuse_gate_up(&mut self) -> Result<()> {
        if self.gate_up.is_none() {
            self.gate_up = linear::fuse(&mut [&mut self.gate_proj, &mut self.up_proj])?;
        }
        Ok(())
    }
}
