//! Vocabulary helpers that mirror transformers' Python code exactly:
//! the GPT-2 byte alphabet (`bytes_to_unicode`), BPE merges recovered from a
//! vocabulary (`generate_merges`), and Python `dict` semantics for building a
//! vocabulary from a token list that may repeat a token.

use std::cmp::Ordering;
use std::collections::HashMap;

/// `transformers.convert_slow_tokenizer.bytes_to_unicode()`: the printable
/// character standing for each byte in a byte-level BPE vocabulary.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = Vec::with_capacity(256);
    printable.extend(u32::from(b'!')..=u32::from(b'~'));
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = ['\0'; 256];
    for &b in &printable {
        table[b as usize] = char::from_u32(b).unwrap_or('\0');
    }
    let mut n = 0u32;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            table[b as usize] = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
        }
    }
    table
}

/// Python's `str.isspace()` for one character: Rust's `White_Space` plus the
/// four ASCII information separators U+001C..U+001F.
pub(crate) fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A Python `dict` built by inserting `(key, value)` pairs in order: a
/// repeated key keeps its first position and takes the last value.
pub(crate) struct PyDict<V> {
    entries: Vec<(String, V)>,
    index: HashMap<String, usize>,
}

impl<V> PyDict<V> {
    /// `{k: v for k, v in pairs}`.
    pub(crate) fn from_pairs(pairs: impl IntoIterator<Item = (String, V)>) -> Self {
        let mut d = PyDict {
            entries: Vec::new(),
            index: HashMap::new(),
        };
        for (k, v) in pairs {
            match d.index.get(&k) {
                Some(&i) => d.entries[i].1 = v,
                None => {
                    d.index.insert(k.clone(), d.entries.len());
                    d.entries.push((k, v));
                }
            }
        }
        d
    }

    /// The value under `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&V> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// The entries in insertion order.
    pub(crate) fn entries(&self) -> &[(String, V)] {
        &self.entries
    }
}

/// A merge candidate with its sort key.
struct Candidate<'a> {
    left: &'a str,
    right: &'a str,
    score: f64,
    left_chars: usize,
    right_chars: usize,
}

/// `transformers.tokenization_utils_base.generate_merges(vocab, vocab_scores)`
/// without `skip_tokens`.
///
/// For every token (in the order of `vocab_scores`, or of `vocab` when there
/// are no scores), every split into two pieces that are both in `vocab` is a
/// merge; a token's merges are ordered by the pieces' ids, then all merges
/// are stably sorted by `(score, len(left), len(right))` — descending when
/// scores are given, ascending by token id otherwise. Lengths count Unicode
/// scalar values, as Python does.
pub(crate) fn generate_merges(
    vocab: &PyDict<u32>,
    vocab_scores: Option<&PyDict<f64>>,
) -> Vec<(String, String)> {
    let reverse = vocab_scores.is_some();
    let scored: Vec<(&str, f64)> = match vocab_scores {
        Some(scores) => scores
            .entries()
            .iter()
            .map(|(t, s)| (t.as_str(), *s))
            .collect(),
        None => vocab
            .entries()
            .iter()
            .map(|(t, id)| (t.as_str(), f64::from(*id)))
            .collect(),
    };

    let mut merges: Vec<Candidate<'_>> = Vec::new();
    let mut local: Vec<(Candidate<'_>, u32, u32)> = Vec::new();
    for (merge, score) in scored {
        local.clear();
        let total_chars = merge.chars().count();
        for (n_left, (split, _)) in merge.char_indices().enumerate().skip(1) {
            let (left, right) = merge.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                local.push((
                    Candidate {
                        left,
                        right,
                        score,
                        left_chars: n_left,
                        right_chars: total_chars - n_left,
                    },
                    l,
                    r,
                ));
            }
        }
        local.sort_by_key(|(_, l, r)| (*l, *r));
        merges.extend(local.drain(..).map(|(c, _, _)| c));
    }

    let key_cmp = |a: &Candidate<'_>, b: &Candidate<'_>| {
        a.score
            .partial_cmp(&b.score)
            .unwrap_or(Ordering::Equal)
            .then(a.left_chars.cmp(&b.left_chars))
            .then(a.right_chars.cmp(&b.right_chars))
    };
    if reverse {
        // Python's `sorted(..., reverse=True)` keeps equal keys in their original order.
        merges.sort_by(|a, b| key_cmp(b, a));
    } else {
        merges.sort_by(key_cmp);
    }
    merges
        .into_iter()
        .map(|c| (c.left.to_owned(), c.right.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> PyDict<u32> {
        PyDict::from_pairs(
            tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), i as u32)),
        )
    }

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn pydict_keeps_first_position_and_last_value() {
        let d = PyDict::from_pairs([("a".to_string(), 1), ("b".into(), 2), ("a".into(), 3)]);
        assert_eq!(d.entries(), &[("a".to_string(), 3), ("b".to_string(), 2)]);
    }

    #[test]
    fn merges_by_id_without_scores() {
        let v = vocab(&["a", "b", "c", "ab", "bc", "abc"]);
        let m = generate_merges(&v, None);
        // "ab" (id 3), "bc" (id 4), then "abc" (id 5): a|bc (left length 1) before ab|c.
        assert_eq!(
            m,
            vec![
                ("a".to_string(), "b".to_string()),
                ("b".into(), "c".into()),
                ("a".into(), "bc".into()),
                ("ab".into(), "c".into()),
            ]
        );
    }

    #[test]
    fn merges_by_score_descending_and_multibyte() {
        let v = vocab(&["é", "t", "ét", "▁", "▁ét"]);
        let scores = PyDict::from_pairs([
            ("é".to_string(), 0.0),
            ("t".into(), 0.0),
            ("ét".into(), -1.0),
            ("▁".into(), 0.0),
            ("▁ét".into(), -0.5),
        ]);
        let m = generate_merges(&v, Some(&scores));
        assert_eq!(
            m,
            vec![
                ("▁".to_string(), "ét".to_string()),
                ("é".into(), "t".into()),
            ]
        );
    }
}
