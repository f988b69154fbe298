//! A dense projection `y = x Wᵀ + b` with the weight in PyTorch layout `[out, in]`.

use super::hooks::{Hooks, Proj};
use crate::error::Result;
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

/// One projection for several that share an input: their weights (and
/// biases) stacked by rows, so `x` goes through one matmul. Each part's weight
/// becomes a view of the stacked one, so no memory is added. `None` when only
/// some of the parts have a bias.
pub fn fuse(parts: &mut [&mut Linear]) -> Result<Option<Linear>> {
    let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
    let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
    if !biases.is_empty() && biases.len() != parts.len() {
        return Ok(None);
    }
    let fused = Linear {
        weight: Tensor::f_cat(&weights, 0)?,
        bias: if biases.is_empty() {
            None
        } else {
            Some(Tensor::f_cat(&biases, 0)?)
        },
    };
    let mut start = 0;
    for p in parts.iter_mut() {
        let rows = p.weight.size()[0];
        p.weight = fused.weight.f_narrow(0, start, rows)?;
        if let Some(b) = &fused.bias {
            p.bias = Some(b.f_narrow(0, start, rows)?);
        }
        start += rows;
    }
    Ok(Some(fused))
}

/// `fused`'s output for `x`, split back into its parts' outputs (views), each
/// passed through `hooks` as projection `which[i]` of `layer`.
pub fn forward_split(
    fused: &Linear,
    x: &Tensor,
    widths: &[i64],
    layer: usize,
    which: &[Proj],
    hooks: &dyn Hooks,
) -> Result<Vec<Tensor>> {
    let parts = fused.forward(x).f_split_with_sizes(widths, -1)?;
    Ok(parts
        .into_iter()
        .zip(which)
        .map(|(y, &w)| hooks.adjust_linear(layer, w, x, y))
        .collect())
}
