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

/// Replaces each span position's score by the mean score of the positions
/// within `half` of it in the same span (a span-local average pool, as
/// SnapKV pools attention): a run of high-scoring tokens (the digits of a
/// number, a name) then outranks a stray peak of the same height, so top-k
/// keeps runs whole rather than in fragments. Positions at +inf (forced or
/// sinks) stay forced. `half = 0` leaves the scores as they are.
pub fn span_mean_pool(scores: &mut [f32], spans: &[Span], half: usize) {
    if half == 0 {
        return;
    }
    for &(s, n) in spans {
        let end = (s + n).min(scores.len());
        if s >= end {
            continue;
        }
        let raw: Vec<f32> = scores[s..end].to_vec();
        let finite = |x: f32| if x.is_finite() { x } else { 0.0 };
        for (i, out) in scores[s..end].iter_mut().enumerate() {
            if raw[i] == f32::INFINITY {
                continue;
            }
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(raw.len());
            // Positions past the span's ends count as 0 (a zero-padded pool).
            let sum: f32 = raw[lo..hi].iter().map(|&x| finite(x)).sum();
            *out = sum / (2 * half + 1) as f32;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_mean_pool_keeps_a_run_whole() {
        // One span over positions 1..10 (budget 3): a 3-token "number" at
        // 5..8 whose middle token scores low, and a stray peak at 2.
        let mut s = vec![9.0, 0.0, 4.5, 0.0, 0.0, 4.0, 1.0, 4.0, 0.0, 0.0, 9.0];
        let spans = [(1, 9)];
        let plain = select(&s, 11, &spans, 3.0 / 9.0).unwrap();
        assert_eq!(plain.kept, vec![0, 2, 5, 7, 10], "unpooled: the run is cut");
        span_mean_pool(&mut s, &spans, 1);
        assert_eq!(
            (s[0], s[10]),
            (9.0, 9.0),
            "outside the spans nothing changes"
        );
        assert_eq!(s[6], 3.0);
        let pooled = select(&s, 11, &spans, 3.0 / 9.0).unwrap();
        assert_eq!(pooled.kept, vec![0, 5, 6, 7, 10], "pooled: the whole run");
        // Forced positions stay forced; half 0 is the identity.
        let mut t = vec![0.0, f32::INFINITY, 0.0, 3.0];
        span_mean_pool(&mut t, &[(0, 4)], 1);
        assert_eq!(t[1], f32::INFINITY);
        assert!(t.iter().all(|x| !x.is_nan()));
        let mut u = vec![1.0, 2.0, 3.0];
        span_mean_pool(&mut u, &[(0, 3)], 0);
        assert_eq!(u, vec![1.0, 2.0, 3.0]);
    }
}
