//! SQuAD v1.1 answer metrics, as the official `evaluate-v1.1.py` defines them.
//!
//! The official script normalises both answers (lower-case, drop the ASCII
//! punctuation of Python's `string.punctuation`, drop the articles `a`, `an`,
//! `the` as whole words, collapse whitespace) and then scores
//!
//! * exact match: the normalised strings are equal;
//! * F1: the harmonic mean of token precision and recall, where the overlap is
//!   the multiset (Python `Counter`) intersection of the whitespace tokens;
//!
//! each taking the maximum over the gold answers of a question. The corpus
//! scores are the means of those maxima, in percent.
//!
//! Unicode follows Rust's tables where the script follows Python's: both
//! lower-case with the full Unicode mappings (final sigma included), and
//! whitespace is matched exactly as Python's `str.split()` does. The only known
//! difference is the word boundary of the article rule: Rust's
//! [`char::is_alphanumeric`] also counts combining marks and symbols with the
//! Unicode `Other_Alphabetic` property (Indic vowel signs, circled letters) as
//! word characters, Python's `\w` does not, so an article glued directly to
//! such a character is kept here and dropped by Python. Characters assigned
//! after the Python build's Unicode version may also be classified differently.

use std::collections::HashMap;

/// Whether Python's `str.isspace()` holds for `c`, which is what `str.split()`
/// (without arguments) splits on: Unicode `White_Space` plus the ASCII
/// information separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Whether `c` is a word character for Python's `\b` (`\w` = `str.isalnum()`
/// or `_`). See the module docs for the one known difference.
fn is_py_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `c` is in Python's `string.punctuation` (the 32 ASCII punctuation
/// characters).
fn is_py_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
}

/// `re.sub(r'\b(a|an|the)\b', ' ', text)`: every maximal run of word characters
/// that is exactly `a`, `an` or `the` becomes one space.
fn remove_articles(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(first) = rest.chars().next() {
        let is_word = is_py_word(first);
        let end = rest
            .char_indices()
            .find(|&(_, c)| is_py_word(c) != is_word)
            .map_or(rest.len(), |(i, _)| i);
        let run = &rest[..end];
        if is_word && matches!(run, "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(run);
        }
        rest = &rest[end..];
    }
    out
}

/// Normalises an answer as the official SQuAD v1.1 script does:
/// `white_space_fix(remove_articles(remove_punc(lower(s))))`.
///
/// ```
/// use kvd_trainer::eval::normalize_answer;
/// assert_eq!(normalize_answer("The  Eiffel-Tower!"), "eiffeltower");
/// assert_eq!(normalize_answer("a cat, an owl"), "cat owl");
/// ```
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower.chars().filter(|&c| !is_py_punctuation(c)).collect();
    let no_articles = remove_articles(&no_punc);
    normalized_tokens_of(&no_articles).join(" ")
}

/// Splits like Python's `str.split()` without arguments.
fn normalized_tokens_of(s: &str) -> Vec<&str> {
    s.split(is_py_space).filter(|t| !t.is_empty()).collect()
}

/// The whitespace tokens of the normalised answer (`normalize_answer(s).split()`).
pub fn answer_tokens(s: &str) -> Vec<String> {
    normalized_tokens_of(&normalize_answer(s))
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Exact match: the normalised prediction equals the normalised gold answer
/// (`exact_match_score`). Two answers that normalise to the empty string match.
pub fn exact_match(prediction: &str, gold: &str) -> bool {
    normalize_answer(prediction) == normalize_answer(gold)
}

/// Token-level F1 in `[0, 1]` between a prediction and one gold answer
/// (`f1_score`): the overlap is the bag-of-tokens (Counter) intersection; no
/// overlap, including an empty prediction or gold answer, scores 0.
pub fn f1(prediction: &str, gold: &str) -> f64 {
    let pred = answer_tokens(prediction);
    let gold = answer_tokens(gold);
    let mut gold_counts: HashMap<&str, usize> = HashMap::new();
    for t in &gold {
        *gold_counts.entry(t.as_str()).or_default() += 1;
    }
    let mut num_same = 0usize;
    for t in &pred {
        if let Some(n) = gold_counts.get_mut(t.as_str()) {
            if *n > 0 {
                *n -= 1;
                num_same += 1;
            }
        }
    }
    if num_same == 0 {
        return 0.0;
    }
    // The script's arithmetic, operation for operation.
    let precision = 1.0 * num_same as f64 / pred.len() as f64;
    let recall = 1.0 * num_same as f64 / gold.len() as f64;
    (2.0 * precision * recall) / (precision + recall)
}

/// Exact match and F1 of a prediction against every gold answer of a question,
/// each maximised over the golds (`metric_max_over_ground_truths`). With no
/// gold answers both are `false`/0 (the official script would fail on `max([])`).
pub fn best_over<S: AsRef<str>>(prediction: &str, golds: &[S]) -> (bool, f64) {
    golds.iter().fold((false, 0.0f64), |(em, f), g| {
        let g = g.as_ref();
        (em || exact_match(prediction, g), f.max(f1(prediction, g)))
    })
}

/// Running totals of per-question scores; the corpus metrics of the official
/// script are [`MetricSum::exact_match`] and [`MetricSum::f1`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricSum {
    /// Questions scored.
    pub count: usize,
    /// Questions with an exact match.
    pub exact: usize,
    /// Sum of the per-question F1 scores (each in `[0, 1]`).
    pub f1_sum: f64,
}

impl MetricSum {
    /// An empty sum.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one question's scores (as returned by [`best_over`]).
    pub fn add(&mut self, exact_match: bool, f1: f64) {
        self.count += 1;
        self.exact += usize::from(exact_match);
        self.f1_sum += f1;
    }

    /// Scores `prediction` against `golds` with [`best_over`] and adds the result;
    /// returns the question's scores.
    pub fn add_prediction<S: AsRef<str>>(&mut self, prediction: &str, golds: &[S]) -> (bool, f64) {
        let (em, f) = best_over(prediction, golds);
        self.add(em, f);
        (em, f)
    }

    /// Adds another sum (e.g. of another shard) to this one.
    pub fn merge(&mut self, other: &MetricSum) {
        self.count += other.count;
        self.exact += other.exact;
        self.f1_sum += other.f1_sum;
    }

    /// Mean exact match in percent (0 when nothing was scored).
    pub fn exact_match(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            100.0 * self.exact as f64 / self.count as f64
        }
    }

    /// Mean F1 in percent (0 when nothing was scored).
    pub fn f1(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            100.0 * self.f1_sum / self.count as f64
        }
    }
}

impl std::fmt::Display for MetricSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} EM={:.2} F1={:.2}",
            self.count,
            self.exact_match(),
            self.f1()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn articles_are_whole_words() {
        assert_eq!(remove_articles("a theory an"), "  theory  ");
        assert_eq!(remove_articles("thea"), "thea");
    }
}
