//! The bridge from the data crate to the distillation step: the model's
//! tokenizer as a [`TextTokenizer`], and built examples as [`DistillExample`]s.

use super::step::DistillExample;
use crate::tokenizer::Tokenizer;
use kvd_data::{DataError, Example, TextTokenizer};
use std::sync::Arc;

/// The model's own tokenizer for the example builder (BOS before the context,
/// EOS after an answer, as the model's tokenizer defines them).
#[derive(Clone)]
pub struct ModelTokenizer(pub Arc<Tokenizer>);

impl TextTokenizer for ModelTokenizer {
    fn encode(&self, text: &str) -> kvd_data::Result<Vec<u32>> {
        self.0
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer(e.to_string()))
    }
    fn bos_id(&self) -> Option<u32> {
        self.0.bos_token_id()
    }
    fn eos_id(&self) -> Option<u32> {
        self.0.eos_token_id()
    }
}

/// A built example as a step input: context = prefix + span, one span, the
/// answer (if any) relative to the suffix.
pub fn to_distill(ex: &Example) -> DistillExample {
    let ctx_len = ex.prefix_len + ex.span_len;
    DistillExample {
        context: ex.tokens[..ctx_len].to_vec(),
        spans: vec![(ex.prefix_len, ex.span_len)],
        suffix: ex.tokens[ctx_len..].to_vec(),
        ratio: ex.ratio as f64,
        answer: ex.answer_span.map(|(s, n)| (s.saturating_sub(ctx_len), n)),
        context_answers: ex.context_answers.clone(),
    }
}
