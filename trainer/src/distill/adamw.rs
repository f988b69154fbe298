//! AdamW over the adaptor's variables with its state in plain tensors, so a
//! checkpoint can hold it (libtorch's optimizer state is not reachable from tch)
//! and every rank applies bit-identical updates. The update is PyTorch's
//! `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments).

use crate::error::{ModelError, Result};
use tch::{Kind, Tensor};

/// Adam hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer. The variables live in one flat float32 buffer (moved there
/// by [`AdamW::new`]), as do the moments, so an update is a handful of
/// kernels over all variables at once rather than a handful per variable.
/// Each element sees the same operations as in a per-variable update.
pub struct AdamW {
    cfg: AdamWConfig,
    /// Updates applied so far (the bias-correction count).
    pub steps: u64,
    params: Tensor,
    m: Tensor,
    v: Tensor,
    /// Offset and shape of each variable in the flat buffers.
    layout: Vec<(i64, Vec<i64>)>,
}

impl AdamW {
    /// Moves `vars` (float32, one device) into one flat buffer, in order (each
    /// variable becomes a view of its slot, keeping its values), with zero
    /// moments.
    pub fn new(vars: &[Tensor], cfg: AdamWConfig) -> Result<Self> {
        let device = vars.first().map_or(tch::Device::Cpu, Tensor::device);
        let mut layout = Vec::with_capacity(vars.len());
        let mut total = 0i64;
        for v in vars {
            if v.kind() != Kind::Float || v.device() != device {
                return Err(ModelError::Input(format!(
                    "AdamW variables must be float32 on one device, got {:?} on {:?}",
                    v.kind(),
                    v.device()
                )));
            }
            layout.push((total, v.size()));
            total += v.numel() as i64;
        }
        let params = Tensor::f_zeros([total], (Kind::Float, device))?;
        tch::no_grad(|| -> Result<()> {
            for (var, (off, size)) in vars.iter().zip(&layout) {
                let n = var.numel() as i64;
                params
                    .f_narrow(0, *off, n)?
                    .f_copy_(&var.f_reshape([-1])?)?;
                let _ = var.shallow_clone().f_set_source_tensor_storage_offset_(
                    &params,
                    *off,
                    size,
                    contiguous_strides(size),
                )?;
            }
            Ok(())
        })?;
        Ok(Self {
            cfg,
            steps: 0,
            m: params.f_zeros_like()?,
            v: params.f_zeros_like()?,
            params,
            layout,
        })
    }

    /// One update with the flat gradients `grads` (in variable order, as
    /// `FlatGrads::grads`) at learning rate `lr`.
    pub fn step(&mut self, grads: &Tensor, lr: f64) -> Result<()> {
        if grads.size() != self.params.size() {
            return Err(ModelError::Input(format!(
                "{:?} gradients for {:?} parameters",
                grads.size(),
                self.params.size()
            )));
        }
        self.steps += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bc2 = 1.0 - c.beta2.powi(self.steps as i32);
        let (p, m, v, g) = (&mut self.params, &mut self.m, &mut self.v, grads);
        tch::no_grad(|| -> Result<()> {
            if c.weight_decay != 0.0 {
                let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
            }
            let _ = m.f_mul_scalar_(c.beta1)?;
            let _ = m.f_add_(&g.f_mul_scalar(1.0 - c.beta1)?)?;
            let _ = v.f_mul_scalar_(c.beta2)?;
            let _ = v.f_addcmul_(g, &g.f_mul_scalar(1.0 - c.beta2)?)?;
            let denom = v.f_sqrt()?.f_div_scalar(bc2.sqrt())?.f_add_scalar(c.eps)?;
            let _ = p.f_addcdiv_(&m.f_mul_scalar(-lr / bc1)?, &denom)?;
            Ok(())
        })
    }

    /// Views of one flat buffer's slots, shaped like the variables.
    fn views(&self, flat: &Tensor) -> Vec<Tensor> {
        self.layout
            .iter()
            .map(|(off, size)| {
                let n: i64 = size.iter().product();
                flat.narrow(0, *off, n).view(size.as_slice())
            })
            .collect()
    }

    /// The first moments, one per variable (views of the flat buffer).
    pub fn first_moments(&self) -> Vec<Tensor> {
        self.views(&self.m)
    }

    /// The second moments, one per variable (views of the flat buffer).
    pub fn second_moments(&self) -> Vec<Tensor> {
        self.views(&self.v)
    }

    /// Sets the moments (one per variable, shaped like it) and the update count.
    pub fn restore(&mut self, steps: u64, m: &[Tensor], v: &[Tensor]) -> Result<()> {
        if m.len() != self.layout.len() || v.len() != self.layout.len() {
            return Err(ModelError::Input(format!(
                "optimizer state has {} / {} moments for {} variables",
                m.len(),
                v.len(),
                self.layout.len()
            )));
        }
        tch::no_grad(|| -> Result<()> {
            for (dst, src) in self
                .first_moments()
                .into_iter()
                .zip(m)
                .chain(self.second_moments().into_iter().zip(v))
            {
                if dst.size() != src.size() {
                    return Err(ModelError::Input(format!(
                        "optimizer moment is {:?}, its variable {:?}",
                        src.size(),
                        dst.size()
                    )));
                }
                dst.shallow_clone().f_copy_(src)?;
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }

    /// The moments as named tensors (`adam.m.<name>`, `adam.v.<name>`), for checkpoints.
    pub fn named_state(&self, names: &[String]) -> Vec<(String, Tensor)> {
        let (m, v) = (self.first_moments(), self.second_moments());
        let mut out = Vec::with_capacity(2 * names.len());
        for (i, n) in names.iter().enumerate() {
            out.push((format!("adam.m.{n}"), m[i].shallow_clone()));
            out.push((format!("adam.v.{n}"), v[i].shallow_clone()));
        }
        out
    }
}

/// Row-major strides of `size`.
pub(crate) fn contiguous_strides(size: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * size[i + 1].max(1);
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn vars() -> Vec<Tensor> {
        tch::manual_seed(0);
        vec![
            Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            Tensor::randn([5], (Kind::Float, Device::Cpu)).set_requires_grad(true),
        ]
    }

    /// The per-variable update (the optimizer's code before it went flat)
    /// that the flat one must reproduce element for element; updates `m`, `v`.
    fn reference_step(
        p: &Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        lr: f64,
        t: i32,
    ) -> Tensor {
        let c = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let mut p = p.copy();
        let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay).unwrap();
        let _ = m.f_mul_scalar_(c.beta1).unwrap();
        let _ = m.f_add_(&g.f_mul_scalar(1.0 - c.beta1).unwrap()).unwrap();
        let _ = v.f_mul_scalar_(c.beta2).unwrap();
        let _ = v
            .f_addcmul_(g, &g.f_mul_scalar(1.0 - c.beta2).unwrap())
            .unwrap();
        let denom = v.sqrt() / bc2.sqrt() + c.eps;
        let _ = p
            .f_addcdiv_(&m.f_mul_scalar(-lr / bc1).unwrap(), &denom)
            .unwrap();
        p
    }

    #[test]
    fn flat_update_equals_the_per_variable_update_and_keeps_variables_as_views() {
        let vs = vars();
        let before: Vec<Tensor> = vs.iter().map(|v| v.detach().copy()).collect();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&vs, cfg).unwrap();
        // The variables kept their values and now live in the flat buffer.
        for (v, b) in vs.iter().zip(&before) {
            assert!(v.equal(b));
        }
        let (mut m_ref, mut v_ref): (Vec<Tensor>, Vec<Tensor>) = before
            .iter()
            .map(|b| (b.zeros_like(), b.zeros_like()))
            .unzip();
        let mut p_ref: Vec<Tensor> = before.iter().map(Tensor::copy).collect();
        for t in 1..=3 {
            let grads: Vec<Tensor> = vs
                .iter()
                .map(|v| Tensor::randn(v.size(), (Kind::Float, Device::Cpu)))
                .collect();
            let flat = Tensor::cat(
                &grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
                0,
            );
            opt.step(&flat, 0.01).unwrap();
            for i in 0..vs.len() {
                p_ref[i] = tch::no_grad(|| {
                    reference_step(&p_ref[i], &grads[i], &mut m_ref[i], &mut v_ref[i], 0.01, t)
                });
                assert!(vs[i].detach().equal(&p_ref[i]), "variable {i} at step {t}");
            }
        }
        assert_eq!(opt.steps, 3);
        // Moments come back per variable and restore into a fresh optimizer.
        let (m, v) = (opt.first_moments(), opt.second_moments());
        for i in 0..vs.len() {
            assert!(m[i].equal(&m_ref[i]) && v[i].equal(&v_ref[i]));
        }
        let vs2 = vars();
        let mut opt2 = AdamW::new(&vs2, cfg).unwrap();
        opt2.restore(3, &m, &v).unwrap();
        assert_eq!(opt2.steps, 3);
        assert!(opt2.first_moments()[1].equal(&m_ref[1]));
        // Wrong shapes and counts are refused.
        assert!(opt2.restore(1, &m[..1], &v[..1]).is_err());
        assert!(opt2
            .restore(1, &[m[1].shallow_clone(), m[0].shallow_clone()], &v)
            .is_err());
        assert!(opt2
            .step(&Tensor::zeros([3], (Kind::Float, Device::Cpu)), 0.01)
            .is_err());
        // A variable of another kind is refused.
        let half = Tensor::zeros([2], (Kind::Half, Device::Cpu));
        assert!(AdamW::new(&[half], cfg).is_err());
    }
}
