//! The distillation loss: `a * KL(p_T || p_S) + (1 - a) * KL(p_S || p_T)` over
//! selected token rows, computed chunk by chunk with its gradient written
//! analytically, so no full `[tokens x vocab]` float32 tensor (nor autograd's
//! saved copies of one) ever exists. The sums stay on the device until
//! [`KlOutput::values`] reads them, so the caller can launch the backward first.

use crate::error::Result;
use tch::{Kind, Tensor};

/// The KL mix's gradient, and its value still on the device.
#[derive(Debug)]
pub struct KlOutput {
    /// d loss / d student logits, `[rows, vocab]` in the student logits' kind.
    pub grad: Tensor,
    /// Sums over rows of the forward and reverse KL, float64 scalars.
    sums: (Tensor, Tensor),
    rows: i64,
    a: f64,
    /// The selection loss (a detached scalar), when the step computes one.
    pub select: Option<Tensor>,
}

/// The KL mix's value.
#[derive(Debug, Clone, Copy)]
pub struct KlValues {
    /// Mean loss over rows.
    pub loss: f64,
    /// Mean forward KL over rows.
    pub forward_kl: f64,
    /// Mean reverse KL over rows.
    pub reverse_kl: f64,
    /// The selection loss (0 when none is computed).
    pub select_loss: f64,
}

impl KlOutput {
    /// Reads the value (waits for the device to compute it).
    pub fn values(&self) -> Result<KlValues> {
        let n = self.rows.max(1) as f64;
        let forward_kl = self.sums.0.f_double_value(&[])? / n;
        let reverse_kl = self.sums.1.f_double_value(&[])? / n;
        let select_loss = match &self.select {
            Some(t) => t.f_double_value(&[])?,
            None => 0.0,
        };
        Ok(KlValues {
            loss: self.a * forward_kl + (1.0 - self.a) * reverse_kl,
            forward_kl,
            reverse_kl,
            select_loss,
        })
    }
}

/// Computes the KL mix between teacher and student logits (`[rows, vocab]`,
/// any float kind), averaged over rows, with weight `a` on forward KL, at
/// temperature `tau`, `chunk` rows at a time.
pub fn kl_mix(
    teacher: &Tensor,
    student: &Tensor,
    a: f64,
    tau: f64,
    chunk: i64,
) -> Result<KlOutput> {
    tch::no_grad(|| {
        let rows = student.size()[0];
        let grad = student.f_zeros_like()?;
        let zero = || Tensor::f_zeros([], (Kind::Double, student.device()));
        let (mut fkl_sum, mut rkl_sum) = (zero()?, zero()?);
        let chunk = chunk.max(1);
        let mut start = 0;
        while start < rows {
            let len = chunk.min(rows - start);
            let t = teacher.f_narrow(0, start, len)?.f_to_kind(Kind::Float)? / tau;
            let s = student.f_narrow(0, start, len)?.f_to_kind(Kind::Float)? / tau;
            let logp = t.f_log_softmax(-1, Kind::Float)?;
            let logq = s.f_log_softmax(-1, Kind::Float)?;
            let p = logp.exp();
            let q = logq.exp();
            let diff = &logq - &logp;
            let fkl = (&p * -&diff).f_sum_dim_intlist(-1, true, Kind::Float)?;
            let rkl = (&q * &diff).f_sum_dim_intlist(-1, true, Kind::Float)?;
            // The same float64 additions, in the same order, as summing on the host.
            let _ = fkl_sum.f_add_(&fkl.f_sum(Kind::Double)?)?;
            let _ = rkl_sum.f_add_(&rkl.f_sum(Kind::Double)?)?;
            // d FKL/ds = q - p ; d RKL/ds = q * (log q - log p - RKL)
            let g = (&q - &p) * a + &q * (&diff - &rkl) * (1.0 - a);
            let g = g / (tau * rows as f64);
            grad.f_narrow(0, start, len)?
                .f_copy_(&g.f_to_kind(grad.kind())?)?;
            start += len;
        }
        Ok(KlOutput {
            grad,
            sums: (fkl_sum, rkl_sum),
            rows,
            a,
            select: None,
        })
    })
}
