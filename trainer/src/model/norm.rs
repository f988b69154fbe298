//! RMSNorm in the two flavours of the supported families.

use tch::{Kind, Tensor};

/// Root-mean-square layer norm. Computed in float32 like transformers:
/// Llama-style returns `w * x_normed.to(dtype)`, Gemma-style `(x_normed * (1 + w)).to(dtype)`.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    plus_one: bool,
}

impl RmsNorm {
    /// Wraps a loaded weight.
    pub fn new(weight: Tensor, eps: f64, plus_one: bool) -> Self {
        RmsNorm {
            weight,
            eps,
            plus_one,
        }
    }

    /// The scale weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if x.device().is_cuda() && !self.plus_one {
            // One fused kernel forward and backward (libtorch's
            // `_fused_rms_norm`): float32 inside, rounded once at the end
            // instead of before the weight multiply.
            let dim = self.weight.size();
            if let Ok((y, _)) =
                x.f_internal_fused_rms_norm(dim.as_slice(), Some(&self.weight), self.eps)
            {
                return y;
            }
        }
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        if self.plus_one {
            (h * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
        } else {
            &self.weight * h.to_kind(kind)
        }
    }
}
