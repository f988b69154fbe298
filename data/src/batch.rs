//! Padded batches as plain vectors (row-major `[batch, seq_len]`), and
//! micro-batching with an optional length-bucketing order.

use crate::builder::Example;

/// A right-padded batch. Every `Vec` of per-token values is `batch * seq_len` long.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Row ids, one per example.
    pub ids: Vec<u64>,
    /// Examples in the batch.
    pub batch_size: usize,
    /// Padded length.
    pub seq_len: usize,
    /// Token ids (padding: the pad id).
    pub input_ids: Vec<i64>,
    /// True at real tokens.
    pub attention_mask: Vec<bool>,
    /// True at span tokens (the compressed part).
    pub span_mask: Vec<bool>,
    /// True at suffix tokens (where the loss is taken).
    pub suffix_mask: Vec<bool>,
    /// True at answer tokens (QA; for the answer-only loss option).
    pub answer_mask: Vec<bool>,
    /// Per example: prefix length.
    pub prefix_len: Vec<i64>,
    /// Per example: span length.
    pub span_len: Vec<i64>,
    /// Per example: suffix length.
    pub suffix_len: Vec<i64>,
    /// Per example: retention ratio.
    pub ratios: Vec<f32>,
}

impl Batch {
    /// Pads `examples` to the longest, rounded up to a multiple of `pad_multiple` (>= 1).
    pub fn pad(examples: &[Example], pad_id: i64, pad_multiple: usize) -> Batch {
        let m = pad_multiple.max(1);
        let longest = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        let seq_len = longest.div_ceil(m) * m;
        let n = examples.len() * seq_len;
        let mut b = Batch {
            ids: Vec::with_capacity(examples.len()),
            batch_size: examples.len(),
            seq_len,
            input_ids: vec![pad_id; n],
            attention_mask: vec![false; n],
            span_mask: vec![false; n],
            suffix_mask: vec![false; n],
            answer_mask: vec![false; n],
            prefix_len: Vec::with_capacity(examples.len()),
            span_len: Vec::with_capacity(examples.len()),
            suffix_len: Vec::with_capacity(examples.len()),
            ratios: Vec::with_capacity(examples.len()),
        };
        for (i, e) in examples.iter().enumerate() {
            let row = i * seq_len;
            for (j, &t) in e.tokens.iter().enumerate() {
                b.input_ids[row + j] = t as i64;
                b.attention_mask[row + j] = true;
            }
            let span_end = e.prefix_len + e.span_len;
            b.span_mask[row + e.prefix_len..row + span_end].fill(true);
            b.suffix_mask[row + span_end..row + span_end + e.suffix_len].fill(true);
            if let Some((s, l)) = e.answer_span {
                b.answer_mask[row + s..row + s + l].fill(true);
            }
            b.ids.push(e.id);
            b.prefix_len.push(e.prefix_len as i64);
            b.span_len.push(e.span_len as i64);
            b.suffix_len.push(e.suffix_len as i64);
            b.ratios.push(e.ratio);
        }
        b
    }

    /// Real (non-padding) tokens.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m).count()
    }
}

/// Splits a rank's examples into micro-batches of at most `size`. With
/// `bucket_by_length`, examples are first ordered by length (stable, ties by
/// id), so each micro-batch holds similar lengths and pads less. The order is
/// deterministic either way.
pub fn micro_batches(
    mut examples: Vec<Example>,
    size: usize,
    bucket_by_length: bool,
) -> Vec<Vec<Example>> {
    if bucket_by_length {
        examples.sort_by_key(|e| (e.tokens.len(), e.id));
    }
    let size = size.max(1);
    let mut out = Vec::with_capacity(examples.len().div_ceil(size));
    let mut it = examples.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(size).collect());
    }
    out
}
