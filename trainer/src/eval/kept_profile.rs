//! Where a method's kept tokens fall: the share of the spans' tokens it keeps
//! by token class (digits, punctuation, words) and by position within the
//! span (tenths), so a scorer that avoids numbers or keeps only the span's end
//! shows up beside the baselines (`eval` reports it per method and ratio).

use crate::distill::select::Span;
use serde::{Deserialize, Serialize};

/// What a context token is, from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenClass {
    /// Holds an ASCII digit.
    Digit,
    /// Only punctuation, symbols or white space (no letter or digit).
    Punctuation,
    /// Anything else: (pieces of) words.
    Word,
}

impl TokenClass {
    /// The class of a token whose text is `piece`.
    pub fn of(piece: &str) -> TokenClass {
        if piece.chars().any(|c| c.is_ascii_digit()) {
            TokenClass::Digit
        } else if piece.chars().all(|c| !c.is_alphanumeric()) {
            TokenClass::Punctuation
        } else {
            TokenClass::Word
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Keep rates (kept / present, over the spans of every question) of one
/// method at one ratio; `None` where no such token occurred.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptProfile {
    /// Of tokens holding a digit.
    pub digits: Option<f64>,
    /// Of punctuation and white-space tokens.
    pub punctuation: Option<f64>,
    /// Of word tokens.
    pub words: Option<f64>,
    /// Of the tokens in each tenth of their span, first to last.
    pub by_tenth: Vec<Option<f64>>,
}

/// Running counts behind a [`KeptProfile`].
#[derive(Debug, Clone, Default)]
pub struct ProfileSum {
    class: [(f64, f64); 3],
    tenth: [(f64, f64); 10],
}

impl ProfileSum {
    /// Counts one context: the class of each of its tokens, its spans and
    /// its kept positions (ascending).
    pub fn add(&mut self, classes: &[TokenClass], spans: &[Span], kept: &[usize]) {
        for &(start, len) in spans {
            let end = (start + len).min(classes.len());
            for (j, class) in classes.iter().enumerate().take(end).skip(start) {
                let k = f64::from(u8::from(kept.binary_search(&j).is_ok()));
                let c = &mut self.class[class.index()];
                *c = (c.0 + k, c.1 + 1.0);
                let t = &mut self.tenth[((j - start) * 10 / len).min(9)];
                *t = (t.0 + k, t.1 + 1.0);
            }
        }
    }

    /// The rates; `None` when no span token was counted.
    pub fn profile(&self) -> Option<KeptProfile> {
        let rate = |(kept, total): (f64, f64)| (total > 0.0).then(|| kept / total);
        if self.class.iter().all(|c| c.1 == 0.0) {
            return None;
        }
        Some(KeptProfile {
            digits: rate(self.class[TokenClass::Digit.index()]),
            punctuation: rate(self.class[TokenClass::Punctuation.index()]),
            words: rate(self.class[TokenClass::Word.index()]),
            by_tenth: self.tenth.iter().map(|&t| rate(t)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_text() {
        use TokenClass::*;
        for (piece, class) in [
            ("7", Digit),
            (" 1999", Digit),
            ("x2", Digit),
            (",", Punctuation),
            (" ", Punctuation),
            ("\n\n", Punctuation),
            (" —", Punctuation),
            (" the", Word),
            ("é", Word),
        ] {
            assert_eq!(TokenClass::of(piece), class, "{piece:?}");
        }
    }

    #[test]
    fn rates_count_span_tokens_by_class_and_tenth() {
        use TokenClass::*;
        // Position 0 is outside the span; the span is 1..21 (20 tokens).
        let mut classes = vec![Word; 21];
        classes[3] = Digit;
        classes[4] = Digit;
        classes[5] = Punctuation;
        let mut s = ProfileSum::default();
        s.add(&classes, &[(1, 20)], &[0, 1, 2, 3, 19, 20]);
        let p = s.profile().expect("counted");
        assert_eq!(p.digits, Some(0.5));
        assert_eq!(p.punctuation, Some(0.0));
        assert_eq!(p.words, Some(4.0 / 17.0));
        let tenths: Vec<f64> = p.by_tenth.iter().map(|x| x.expect("present")).collect();
        assert_eq!(tenths, [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(ProfileSum::default().profile(), None);
    }
}
