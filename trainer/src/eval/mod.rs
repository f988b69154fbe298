//! Evaluation building blocks: SQuAD v1.1 metrics (exact match and token F1,
//! bit-for-bit the official `evaluate-v1.1.py`), SQuAD-format dataset loading
//! with deterministic subsets, and PNG plots of F1 against the KV-cache
//! retention ratio.
//!
//! * [`metrics`]: [`normalize_answer`], [`exact_match`], [`f1`], [`best_over`],
//!   [`MetricSum`].
//! * [`squad`]: [`load_squad`] into [`SquadSet`] (questions with their
//!   paragraph, articles with their joined context), [`select_questions`].
//! * [`plot`]: [`plot_f1_vs_ratio`] of [`Series`].
//! * [`error`]: [`EvalError`], which names the file (and field) at fault.
//! * [`answer_groups`]: results by how much of the answer was kept.

pub mod answer_groups;
pub mod error;
pub mod kept_profile;
pub mod metrics;
pub mod needle;
pub mod plot;
pub mod run;
pub mod squad;

pub use error::EvalError;
pub use metrics::{answer_tokens, best_over, exact_match, f1, normalize_answer, MetricSum};
pub use plot::{plot_f1_vs_ratio, plot_heatmaps, HeatPanel, Series, RATIO_TICKS};
pub use squad::{
    load_squad, select_questions, SquadArticle, SquadQuestion, SquadSet, PARAGRAPH_SEPARATOR,
};
