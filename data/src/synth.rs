//! Synthetic retrieval rows: facts (numbers, codes, names) inserted into the
//! training contexts and essays, each asked for by a question whose answer is
//! only in the inserted sentence. A compressor must keep such tokens without
//! seeing the question, and these rows reward exactly that.
//!
//! The phrasings here are for training only. The evaluation's needle test
//! (`kv-distill eval --task needle`) uses other sentence templates, other
//! name lists and other value formats, so that its score measures keeping
//! facts, not recognising a memorised template.

use crate::schema::Record;
use crate::shard::SplitMix64;
use crate::writer::SourcedRecord;

/// The seeded generator, with the draws the facts need.
struct Rng(SplitMix64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0.below_rem(n)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    fn digits(&mut self, n: usize) -> String {
        let mut s = (1 + self.below(9)).to_string();
        for _ in 1..n {
            s.push_str(&self.below(10).to_string());
        }
        s
    }
    fn letters(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| (b'A' + self.below(26) as u8) as char)
            .collect()
    }
}

const PEOPLE: &[&str] = &[
    "Marisol", "Theo", "Anneke", "Rashid", "Yuki", "Olamide", "Sven", "Priya", "Tomasz",
    "Delphine", "Kwame", "Ilse", "Mateo", "Noor", "Bram", "Saoirse",
];
const SURNAMES: &[&str] = &[
    "Quist",
    "Moreau",
    "Achterberg",
    "Nakashima",
    "Delacroix",
    "Mbeki",
    "Lindqvist",
    "Ferreira",
    "Kowalczyk",
    "Oyelaran",
    "Vasquez",
    "Thorne",
];
const ITEMS: &[&str] = &[
    "brass telescope",
    "walnut cake",
    "silver kettle",
    "old atlas",
    "linen banner",
    "copper lantern",
    "wool blanket",
    "clay teapot",
];
const PLACES: &[&str] = &[
    "Aberdeen", "Bilbao", "Cordoba", "Dunedin", "Esbjerg", "Fresno", "Galway", "Hobart", "Izmir",
    "Jaipur", "Kraków", "Lyon",
];

/// One training fact: (sentence, question, answer).
fn fact(rng: &mut Rng) -> (String, String, String) {
    match rng.below(6) {
        0 => {
            let p = rng.pick(PEOPLE);
            let len = 4 + rng.below(3);
            let n = rng.digits(len);
            (
                format!("Note that {p}'s locker combination is {n}."),
                format!("What is {p}'s locker combination?"),
                n,
            )
        }
        1 => {
            let order = rng.digits(3);
            let id = format!("{}{}", rng.letters(2), rng.digits(4));
            (
                format!("The tracking ID for shipment {order} reads {id}."),
                format!("Which tracking ID does shipment {order} have?"),
                id,
            )
        }
        2 => {
            let item = rng.pick(ITEMS);
            let who = format!("{} {}", rng.pick(PEOPLE), rng.pick(SURNAMES));
            (
                format!("Among the guests, the one who brought the {item} was {who}."),
                format!("Who brought the {item}?"),
                who,
            )
        }
        3 => {
            let n = rng.digits(5);
            (
                format!("The pass key is {n}. Remember it."),
                "What is the pass key?".to_string(),
                n,
            )
        }
        4 => {
            let place = rng.pick(PLACES);
            let n = format!("{}.{}", rng.digits(2), rng.digits(1));
            (
                format!("In the ledger, {place} is listed with the figure {n}."),
                format!("Which figure is listed for {place} in the ledger?"),
                n,
            )
        }
        _ => {
            let p = rng.pick(PEOPLE);
            let word = format!("{}{}", rng.letters(1), rng.letters(4).to_lowercase());
            (
                format!("{p} chose the password {word} for the archive."),
                format!("Which password did {p} choose for the archive?"),
                word,
            )
        }
    }
}

/// Splits text into sentences at `. `, `! ` and `? ` (whitespace kept inside).
fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let b = text.as_bytes();
    for i in 0..b.len() {
        if matches!(b[i], b'.' | b'!' | b'?') && b.get(i + 1).is_some_and(|c| *c == b' ') {
            out.push(&text[start..=i]);
            start = i + 2;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// Up to `rows` synthetic retrieval rows from the contexts of `qa` and windows
/// of about `window_words` words of the documents of `text`: each context gets
/// one to three facts at random sentence boundaries, and one row (same
/// context, one question) per fact. Deterministic for `seed`.
pub fn synthesize(
    qa: &[SourcedRecord],
    text: &[SourcedRecord],
    rows: usize,
    window_words: usize,
    seed: u64,
) -> Vec<SourcedRecord> {
    let mut contexts: Vec<String> = Vec::new();
    for r in qa {
        if let Record::Qa { context, .. } = &r.record {
            if contexts.last() != Some(context) && context.split_whitespace().count() >= 40 {
                contexts.push(context.clone());
            }
        }
    }
    for r in text {
        if let Record::Text { text } = &r.record {
            let words: Vec<&str> = text.split_whitespace().collect();
            for w in words.chunks(window_words.max(40)) {
                if w.len() >= 40 {
                    contexts.push(w.join(" "));
                }
            }
        }
    }
    let mut rng = Rng(SplitMix64::new(seed ^ 0x0073_796E_7468));
    let mut out = Vec::new();
    if contexts.is_empty() {
        return out;
    }
    let mut c = 0usize;
    while out.len() < rows {
        let base = &contexts[rng.below(contexts.len())];
        let mut sentences: Vec<String> = split_sentences(base)
            .into_iter()
            .map(str::to_string)
            .collect();
        let facts: Vec<(String, String, String)> =
            (0..1 + rng.below(3)).map(|_| fact(&mut rng)).collect();
        for (s, _, _) in &facts {
            let at = rng.below(sentences.len() + 1);
            sentences.insert(at, s.clone());
        }
        let context = sentences.join(" ");
        for (k, (_, question, answer)) in facts.into_iter().enumerate() {
            if out.len() == rows {
                break;
            }
            out.push(SourcedRecord {
                id: format!("synth/{c}-{k}"),
                source: "synth".into(),
                record: Record::Qa {
                    context: context.clone(),
                    question,
                    answers: vec![answer],
                },
            });
        }
        c += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qa(context: &str) -> SourcedRecord {
        SourcedRecord {
            id: "x".into(),
            source: "t".into(),
            record: Record::Qa {
                context: context.into(),
                question: "q?".into(),
                answers: vec!["a".into()],
            },
        }
    }

    #[test]
    fn every_answer_is_in_its_context_once_inserted() {
        let ctx = "This is a sentence of filler words for the test. ".repeat(12);
        let rows = synthesize(&[qa(ctx.trim())], &[], 50, 200, 3);
        assert_eq!(rows.len(), 50);
        for r in &rows {
            let Record::Qa {
                context, answers, ..
            } = &r.record
            else {
                panic!("not a QA row")
            };
            assert!(
                context.contains(&answers[0]),
                "{} not in {context}",
                answers[0]
            );
            assert!(context.len() > ctx.trim().len());
        }
        assert_eq!(rows, synthesize(&[qa(ctx.trim())], &[], 50, 200, 3));
        assert_ne!(rows, synthesize(&[qa(ctx.trim())], &[], 50, 200, 4));
    }

    #[test]
    fn short_contexts_are_not_used() {
        assert!(synthesize(&[qa("Too short.")], &[], 5, 200, 0).is_empty());
    }
}
