//! Rotary position embeddings (HF "rotate half" layout), computed in float32
//! from explicit positions exactly as transformers does.

use crate::config::{RopeConfig, RopeScaling};
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// Inverse frequencies of one RoPE configuration, `[head_dim / 2]` float32.
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    /// Precomputes the (possibly rescaled) inverse frequencies.
    pub fn new(cfg: &RopeConfig, head_dim: usize, device: Device) -> Self {
        let dim = head_dim as i64;
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / dim as f64;
        let base = Tensor::from(cfg.theta as f32).to_device(device);
        let mut inv_freq = base.pow(&exponents).reciprocal();
        match cfg.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq /= factor,
            RopeScaling::FreqFactors(ref factors) => {
                inv_freq /= Tensor::from_slice(factors).to_device(device);
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_wavelen = old_len / low_freq_factor;
                let high_wavelen = old_len / high_freq_factor;
                let wavelen = (inv_freq.reciprocal()) * (2.0 * std::f64::consts::PI);
                let scaled = (&inv_freq / factor).where_self(&wavelen.gt(low_wavelen), &inv_freq);
                let smooth = ((wavelen.reciprocal() * old_len) - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed =
                    (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium =
                    wavelen.lt(high_wavelen).logical_not() * wavelen.gt(low_wavelen).logical_not();
                inv_freq = smoothed.where_self(&medium, &scaled);
            }
        }
        Rope { inv_freq }
    }

    /// cos and the signed sin (`[-sin, sin]` over the two halves, for [`apply`])
    /// for `positions` (`[batch, seq]` int64), each `[batch, 1, seq, head_dim]` in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let freqs = positions.f_to_kind(Kind::Float)?.unsqueeze(-1)
            * self.inv_freq.unsqueeze(0).unsqueeze(0);
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let cos = emb.cos().to_kind(kind).unsqueeze(1);
        let sin = Tensor::f_cat(&[-freqs.sin(), freqs.sin()], -1)?
            .to_kind(kind)
            .unsqueeze(1);
        Ok((cos, sin))
    }
}

/// Applies RoPE to `x` `[batch, heads, seq, head_dim]` with the tables of
/// [`Rope::cos_sin`]: `x * cos + rotate_half(x) * sin`, where `rotate_half(x) =
/// [-x2, x1]`, written as `roll(x, half) * [-sin, sin]` (bit-identical, since
/// `(-a) * b == a * (-b)`, and two operations fewer).
pub fn apply(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    x * cos + x.roll([half], [3]) * signed_sin
}
