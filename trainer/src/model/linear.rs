//! A dense projection `y = x Wᵀ + b` with the weight in PyTorch layout `[out, in]`.

use super::hooks::{Hooks, Proj};
use tch::Tensor;

/// Dense layer without activation.
#[derive(Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    weight: Tensor,
    /// `Wᵀ` `[in_features, out_features]`: a transposed view of `weight`
    /// (no copy), made once, so a 2-D input's projection is a single matrix
    /// product (`aten::linear` would dispatch a transpose and a `matmul`
    /// around it on every call).
    weight_t: Tensor,
    /// `[out_features]`, if the layer has a bias.
    bias: Option<Tensor>,
}

impl Linear {
    /// The layer of `weight` `[out, in]` and `bias` `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let weight_t = weight.tr();
        Linear {
            weight,
            weight_t,
            bias,
        }
    }

    /// The weight `[out_features, in_features]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out_features]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the projection to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match (x.dim(), &self.bias) {
            (2, None) => x.mm(&self.weight_t),
            (2, Some(b)) => b.addmm(x, &self.weight_t),
            _ => x.linear(&self.weight, self.bias.as_ref()),
        }
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
