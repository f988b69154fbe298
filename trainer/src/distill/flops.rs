//! The FLOP count of one KV-Distill training step, for MFU. Counted from the
//! method's necessary work (multiply-adds x 2), not from kernels launched:
//!
//! - per token and layer, the projections cost `2 P` with
//!   `P = d (q + 2 kv) + q d + 3 d f` (q, kv: query and key/value widths);
//! - causal attention over `n` query/key pairs costs `4 q n` forward
//!   (scores and values) and `8 q n` backward;
//! - the LM head costs `2 d V` per row that needs logits;
//! - backward through frozen weights computes input gradients only (`1x` the
//!   forward matmuls); the trainable LoRA factors and scorer get weight
//!   gradients too (`2x` their forward).
//!
//! Teacher: forward over context + suffix, logits on the `S - 1` supervised
//! rows (its layer-`l` states feed the scorer, no extra pass). Student:
//! scorer on the context, encoder over the context with LoRA, decoder over
//! the suffix attending to the `k` kept positions, logits on `S - 1` rows;
//! forward and backward.

use super::config::DistillConfig;
use crate::config::ModelConfig;

/// FLOPs of one step, by part.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepFlops {
    /// Teacher forward.
    pub teacher: f64,
    /// Student forward (scorer, encoder, decoder, logits).
    pub student_forward: f64,
    /// Student backward.
    pub student_backward: f64,
}

impl StepFlops {
    /// The total.
    pub fn total(&self) -> f64 {
        self.teacher + self.student_forward + self.student_backward
    }
}

fn causal_pairs(n: f64) -> f64 {
    n * (n + 1.0) / 2.0
}

/// FLOPs of a step on `batch` examples, each a context of `context` tokens
/// (`kept` of them kept) followed by a suffix of `suffix` tokens.
pub fn step_flops(
    m: &ModelConfig,
    cfg: &DistillConfig,
    batch: usize,
    context: usize,
    kept: usize,
    suffix: usize,
) -> StepFlops {
    let (d, f, layers, vocab) = (
        m.hidden_size as f64,
        m.intermediate_size as f64,
        m.num_layers as f64,
        m.vocab_size as f64,
    );
    let q = (m.num_heads * m.head_dim) as f64;
    let kv = (m.num_kv_heads * m.head_dim) as f64;
    let p = d * (q + 2.0 * kv) + q * d + 3.0 * d * f;
    let (c, s, k, b) = (context as f64, suffix as f64, kept as f64, batch as f64);
    let rows = (s - 1.0).max(0.0);
    let head = 2.0 * d * vocab * rows;
    let lora_in_out: f64 = cfg
        .lora
        .targets
        .iter()
        .map(|&t| {
            let (i, o) = super::adaptor::proj_dims(m, t);
            (i + o) as f64
        })
        .sum();
    let lora = 2.0 * cfg.lora.rank as f64 * lora_in_out * layers;
    let scorer = 2.0 * (d * d + 2.0 * d) * c;

    let teacher = 2.0 * p * layers * (c + s) + 4.0 * q * layers * causal_pairs(c + s) + head;
    let enc_mm = 2.0 * p * layers * c;
    let enc_attn = 4.0 * q * layers * causal_pairs(c);
    let dec_mm = 2.0 * p * layers * s;
    let dec_attn = 4.0 * q * layers * (s * k + causal_pairs(s));
    let forward = scorer + enc_mm + enc_attn + lora * c + dec_mm + dec_attn + lora * s + head;
    let backward = 2.0 * scorer
        + enc_mm
        + 2.0 * enc_attn
        + 2.0 * lora * c
        + dec_mm
        + 2.0 * dec_attn
        + 2.0 * lora * s
        + head;
    StepFlops {
        teacher: b * teacher,
        student_forward: b * forward,
        student_backward: b * backward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_billion_shape_is_about_six_flops_per_parameter_token() {
        let m = ModelConfig::llama_3_2_1b();
        let cfg = DistillConfig::default();
        let f = step_flops(&m, &cfg, 1, 4097, 411, 256);
        // Non-embedding parameters: 16 layers x ~60.8 M.
        let p = 16.0 * (2048.0 * (2048.0 + 2.0 * 512.0) + 2048.0 * 2048.0 + 3.0 * 2048.0 * 8192.0);
        let tokens = 4097.0 + 256.0;
        // Teacher ~2 P T, student forward ~2 P T, backward ~2 P T (+ attention and logits).
        let ratio = f.total() / (6.0 * p * tokens);
        assert!((1.0..1.6).contains(&ratio), "{ratio}");
        assert!(f.student_backward > f.student_forward * 0.9);
        // Attention is quadratic in the context: doubling it more than doubles the teacher.
        let g = step_flops(&m, &cfg, 1, 8193, 820, 256);
        assert!(g.teacher > 2.0 * f.teacher);
        // Linear in the batch.
        assert_eq!(
            step_flops(&m, &cfg, 3, 4097, 411, 256).total(),
            3.0 * f.total()
        );
    }
}
