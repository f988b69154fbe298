//! A dense projection `y = x Wᵀ + b` with the weight in PyTorch layout `[out, in]`.

use super::hooks::{Hooks, Proj};
use tch::Tensor;

/// Dense layer without activation.
#[derive(Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, if the layer has a bias.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Applies the projection to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// The projection plus whatever `hooks` add for projection `which` of `layer`.
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        layer: usize,
        which: Proj,
        hooks: &dyn Hooks,
    ) -> Tensor {
        hooks.adjust_linear(layer, which, x, self.forward(x))
    }
}
