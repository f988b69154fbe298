//! Which context positions survive compression: everything outside the spans
//! (prefix, text between spans) verbatim, plus the top-k scored positions of
//! each span, k = max(1, ceil(r n)), in original order.

use super::config::kept_count;
use crate::error::{ModelError, Result};

/// A compressible span `[start, start + len)` of a context.
pub type Span = (usize, usize);

/// The kept positions of one context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Kept positions, ascending.
    pub kept: Vec<usize>,
    /// For each kept position, whether it came from a span (scored) or is verbatim.
    pub from_span: Vec<bool>,
}

/// Checks spans against a context of `ctx_len` tokens: inside, non-empty, ordered, disjoint.
pub fn validate_spans(spans: &[Span], ctx_len: usize) -> Result<()> {
    let mut end = 0;
    for &(s, n) in spans {
        if n == 0 {
            return Err(ModelError::Input(format!("empty span at position {s}")));
        }
        if s < end || s + n > ctx_len {
            return Err(ModelError::Input(format!(
                "span [{s}, {}) overlaps another or lies outside the {ctx_len}-token context",
                s + n
            )));
        }
        end = s + n;
    }
    Ok(())
}

/// Keeps the top-k of each span by `scores` (one per context position; ties go to
/// the earlier position) plus every position outside the spans.
pub fn select(scores: &[f32], ctx_len: usize, spans: &[Span], ratio: f64) -> Result<Selection> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(ModelError::Input(format!(
            "retention ratio {ratio} is outside (0, 1]"
        )));
    }
    validate_spans(spans, ctx_len)?;
    if scores.len() < ctx_len {
        return Err(ModelError::Input(format!(
            "{} scores for {ctx_len} positions",
            scores.len()
        )));
    }
    let mut keep = vec![true; ctx_len];
    let mut span_pos = vec![false; ctx_len];
    for &(s, n) in spans {
        let k = kept_count(n, ratio);
        let mut order: Vec<usize> = (s..s + n).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        for &p in &order[k..] {
            keep[p] = false;
        }
        span_pos[s..s + n].fill(true);
    }
    let kept: Vec<usize> = (0..ctx_len).filter(|&p| keep[p]).collect();
    let from_span = kept.iter().map(|&p| span_pos[p]).collect();
    Ok(Selection { kept, from_span })
}
