//! AdamW over the adaptor's variables with its state in plain tensors, so a
//! checkpoint can hold it (libtorch's optimizer state is not reachable from tch)
//! and every rank applies bit-identical updates. The update is PyTorch's
//! `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments).

use crate::error::Result;
use tch::Tensor;

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

/// The optimizer: one first and second moment per variable, in variable order.
pub struct AdamW {
    cfg: AdamWConfig,
    /// Updates applied so far (the bias-correction count).
    pub steps: u64,
    /// First moments.
    pub m: Vec<Tensor>,
    /// Second moments.
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments shaped like `vars`.
    pub fn new(vars: &[Tensor], cfg: AdamWConfig) -> Self {
        let zeros = || vars.iter().map(|v| v.zeros_like().detach()).collect();
        Self {
            cfg,
            steps: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// One update of `vars` (whose gradients are set) at learning rate `lr`.
    pub fn step(&mut self, vars: &[Tensor], lr: f64) -> Result<()> {
        self.steps += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bc2 = 1.0 - c.beta2.powi(self.steps as i32);
        tch::no_grad(|| -> Result<()> {
            for ((p, m), v) in vars.iter().zip(&mut self.m).zip(&mut self.v) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if c.weight_decay != 0.0 {
                    let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                let _ = m.f_mul_scalar_(c.beta1)?;
                let _ = m.f_add_(&g.f_mul_scalar(1.0 - c.beta1)?)?;
                let _ = v.f_mul_scalar_(c.beta2)?;
                let _ = v.f_addcmul_(&g, &g.f_mul_scalar(1.0 - c.beta2)?)?;
                let denom = v.f_sqrt()?.f_div_scalar(bc2.sqrt())?.f_add_scalar(c.eps)?;
                let _ = p.f_addcdiv_(&m.f_mul_scalar(-lr / bc1)?, &denom)?;
            }
            Ok(())
        })
    }

    /// The moments as named tensors (`adam.m.<name>`, `adam.v.<name>`), for checkpoints.
    pub fn named_state(&self, names: &[String]) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * names.len());
        for (i, n) in names.iter().enumerate() {
            out.push((format!("adam.m.{n}"), self.m[i].shallow_clone()));
            out.push((format!("adam.v.{n}"), self.v[i].shallow_clone()));
        }
        out
    }
}
