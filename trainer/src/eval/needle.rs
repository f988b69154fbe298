//! Needle in a haystack: one fact (a number, a code or a name) inserted into
//! filler prose at a chosen depth and context length, then asked for after the
//! context. A question-agnostic compressor must keep the fact without seeing
//! the question; one that drops it fails whatever its average KL.
//!
//! The items are a [`SquadSet`] (the fact's text as the gold answer, its
//! character offset as `answer_start`), so the SQuAD harness evaluates them
//! unchanged. The sentence templates here are for evaluation only: the
//! synthetic retrieval data used in training (`kvd-data prepare`) phrases its
//! facts differently, so a high score cannot come from memorised wording.

use super::plot::{plot_heatmaps, HeatPanel};
use super::run::EvalReport;
use super::squad::{SquadQuestion, SquadSet};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use kvd_data::shard::SplitMix64;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What to build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeedleConfig {
    /// Items in all (spread over the lengths x depths grid, then the kinds).
    pub items: usize,
    /// Context lengths in tokens (approximate: whole sentences are taken).
    pub lengths: Vec<usize>,
    /// Depths of the fact in the context, in [0, 1].
    pub depths: Vec<f64>,
    /// Seed of filler offsets and facts.
    pub seed: u64,
}

impl Default for NeedleConfig {
    fn default() -> Self {
        NeedleConfig {
            items: 300,
            lengths: vec![256, 512, 1024, 2048],
            depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            seed: 0,
        }
    }
}

/// Where an item sits in the grid, by question id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeedleItem {
    /// The question id (`needle-N`).
    pub id: String,
    /// Asked-for context length (tokens).
    pub length: usize,
    /// Depth of the fact.
    pub depth: f64,
    /// `number`, `code` or `name`.
    pub kind: String,
}

/// The seeded generator, with the draws the facts need.
struct Rng(SplitMix64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0.below_rem(n)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

const CITIES: &[&str] = &[
    "Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Perth", "Bergen", "Cusco", "Dakar", "Hanoi",
    "Tbilisi", "Valletta", "Windhoek", "Zagreb", "Leipzig", "Mombasa",
];
const COLORS: &[&str] = &[
    "amber", "crimson", "violet", "teal", "ivory", "cobalt", "scarlet", "olive",
];
const EVENTS: &[&str] = &[
    "harbor regatta",
    "mountain marathon",
    "chess open",
    "poetry prize",
    "glass-blowing fair",
    "kite festival",
];
const FIRST: &[&str] = &[
    "Amara", "Bastian", "Corinne", "Desmond", "Elowen", "Florian", "Greta", "Horatio", "Ingrid",
    "Jasper", "Katalin", "Leopold",
];
const LAST: &[&str] = &[
    "Halvorsen",
    "Okafor",
    "Brandvold",
    "Castellanos",
    "Drummond",
    "Eriksen",
    "Fairweather",
    "Gallagher",
    "Hawthorne",
    "Ivanova",
];

/// The fact kind (mod 3) of item `i` among `lengths` lengths: `i`, shifted
/// by one per pass over the lengths when their count is a multiple of 3
/// (else every item of a length would have the same kind, and a table by
/// length would compare kinds). Other counts keep `i`, so their item sets
/// are those of earlier versions.
fn kind_index(i: usize, lengths: usize) -> usize {
    if lengths.is_multiple_of(3) {
        i + i / lengths
    } else {
        i
    }
}

/// One fact: the sentence, the question, the answer, the kind.
fn fact(rng: &mut Rng, i: usize) -> (String, String, String, &'static str) {
    match i % 3 {
        0 => {
            let city = rng.pick(CITIES);
            let n = format!("{}", 10_000 + rng.below(90_000));
            (
                format!("The special magic number for {city} is {n}."),
                format!("What is the special magic number for {city}?"),
                n,
                "number",
            )
        }
        1 => {
            let color = rng.pick(COLORS);
            let letters: String = (0..3)
                .map(|_| (b'A' + rng.below(26) as u8) as char)
                .collect();
            let code = format!("{letters}-{}", 1000 + rng.below(9000));
            (
                format!("The access code for the {color} vault is {code}."),
                format!("What is the access code for the {color} vault?"),
                code,
                "code",
            )
        }
        _ => {
            let year = 1950 + rng.below(70);
            let event = rng.pick(EVENTS);
            let name = format!("{} {}", rng.pick(FIRST), rng.pick(LAST));
            (
                format!("The winner of the {year} {event} was {name}."),
                format!("Who was the winner of the {year} {event}?"),
                name,
                "name",
            )
        }
    }
}

/// Splits prose into sentences (after `.`, `!` or `?` followed by whitespace),
/// whitespace-normalised, dropping very short fragments.
fn sentences(text: &str) -> Vec<String> {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = flat.chars().peekable();
    while let Some(c) = chars.next() {
        cur.push(c);
        if matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| *n == ' ') {
            let s = cur.trim().to_string();
            if s.split(' ').count() >= 4 {
                out.push(s);
            }
            cur.clear();
        }
    }
    out
}

/// Reads every `.txt` file of `dir` (in name order) as filler sentences.
pub fn load_haystack(dir: &Path) -> Result<Vec<String>> {
    let io = |source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|source| ModelError::Io {
            path: f.clone(),
            source,
        })?;
        out.extend(sentences(&text));
    }
    if out.len() < 50 {
        return Err(ModelError::Input(format!(
            "{}: {} filler sentences in {} .txt files; the needle test needs at least 50",
            dir.display(),
            out.len(),
            files.len()
        )));
    }
    Ok(out)
}

/// Builds `cfg.items` needle questions from `filler` sentences; `tok` measures
/// lengths. Item `i` takes length `i mod L`, depth `(i / L) mod D` and fact
/// kind [`kind_index`] mod 3 (numbers, codes and names in turn, every length
/// getting all three).
pub fn build_needles(
    filler: &[String],
    tok: &Tokenizer,
    cfg: &NeedleConfig,
) -> Result<(SquadSet, Vec<NeedleItem>)> {
    if cfg.lengths.is_empty() || cfg.depths.is_empty() || cfg.items == 0 {
        return Err(ModelError::Input(
            "the needle test needs items, lengths and depths".into(),
        ));
    }
    if let Some(d) = cfg.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        return Err(ModelError::Input(format!(
            "needle depth {d} is outside [0, 1]"
        )));
    }
    let count = |s: &str| -> Result<usize> {
        tok.encode(s, false)
            .map(|t| t.len())
            .map_err(|e| ModelError::Input(e.to_string()))
    };
    let sizes: Vec<usize> = filler.iter().map(|s| count(s)).collect::<Result<_>>()?;
    let mut rng = Rng(SplitMix64::new(cfg.seed ^ 0x6E65_6564_6C65));
    let (mut questions, mut items) = (Vec::new(), Vec::new());
    for i in 0..cfg.items {
        let length = cfg.lengths[i % cfg.lengths.len()];
        let depth = cfg.depths[(i / cfg.lengths.len()) % cfg.depths.len()];
        let (sentence, question, answer, kind) = fact(&mut rng, kind_index(i, cfg.lengths.len()));
        // Consecutive filler sentences from a random start, about `length`
        // tokens with the fact (wrapping around the corpus).
        let start = rng.below(filler.len());
        let budget = length.saturating_sub(count(&sentence)? + 1);
        let mut picked: Vec<&str> = Vec::new();
        let mut used = 0;
        let mut j = start;
        while used < budget && picked.len() < filler.len() {
            if used + sizes[j] > budget && !picked.is_empty() {
                break;
            }
            picked.push(&filler[j]);
            used += sizes[j] + 1;
            j = (j + 1) % filler.len();
        }
        let at = ((depth * picked.len() as f64).round() as usize).min(picked.len());
        let before = picked[..at].join(" ");
        let after = picked[at..].join(" ");
        let mut context = before.clone();
        if !context.is_empty() {
            context.push(' ');
        }
        let answer_start = context.chars().count()
            + sentence
                .find(&answer)
                .map(|b| sentence[..b].chars().count())
                .unwrap_or(0);
        context.push_str(&sentence);
        if !after.is_empty() {
            context.push(' ');
            context.push_str(&after);
        }
        let id = format!("needle-{i}");
        questions.push(SquadQuestion {
            id: id.clone(),
            question,
            answers: vec![answer],
            answer_starts: vec![answer_start],
            context,
            article: 0,
            paragraph: i,
        });
        items.push(NeedleItem {
            id,
            length,
            depth,
            kind: kind.into(),
        });
    }
    let set = SquadSet {
        path: format!(
            "needle(items={}, lengths={:?}, depths={:?}, seed={})",
            cfg.items, cfg.lengths, cfg.depths, cfg.seed
        )
        .into(),
        articles: Vec::new(),
        questions,
    };
    Ok((set, items))
}

/// Mean F1 of `method` at `ratio` per (depth, length) cell of the grid of
/// `report.needle` (rows: depths in order, columns: lengths in order).
pub fn grid(report: &EvalReport, method: &str, ratio: f64) -> Vec<Vec<Option<f64>>> {
    let cfg_lengths = distinct(report.needle.iter().map(|n| n.length as f64));
    let cfg_depths = distinct(report.needle.iter().map(|n| n.depth));
    let mut sums = vec![vec![(0.0, 0usize); cfg_lengths.len()]; cfg_depths.len()];
    let by_id: std::collections::HashMap<&str, &NeedleItem> =
        report.needle.iter().map(|n| (n.id.as_str(), n)).collect();
    for it in &report.items {
        if it.method != method || (it.ratio - ratio).abs() > 1e-9 {
            continue;
        }
        let Some(n) = by_id.get(it.id.as_str()) else {
            continue;
        };
        let x = cfg_lengths.iter().position(|&l| l == n.length as f64);
        let y = cfg_depths.iter().position(|&d| d == n.depth);
        if let (Some(x), Some(y)) = (x, y) {
            sums[y][x].0 += it.f1;
            sums[y][x].1 += 1;
        }
    }
    sums.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|(s, n)| (n > 0).then(|| s / n as f64))
                .collect()
        })
        .collect()
}

fn distinct(xs: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = xs.collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

/// Writes the needle test's heat maps (`needle_r{ratio}.png`, one panel per
/// method: F1 by depth x length) and returns their Markdown (F1 by length
/// and by depth per method and ratio).
pub fn write_needle_report(report: &EvalReport, dir: &Path) -> Result<String> {
    let lengths = distinct(report.needle.iter().map(|n| n.length as f64));
    let depths = distinct(report.needle.iter().map(|n| n.depth));
    let x_labels: Vec<String> = lengths.iter().map(|l| format!("{l:.0}")).collect();
    let y_labels: Vec<String> = depths
        .iter()
        .map(|d| format!("{:.0}%", 100.0 * d))
        .collect();
    let mut methods: Vec<&str> = Vec::new();
    for r in &report.rows {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    let mut md =
        String::from("**Needle F1 (%) by context length (tokens), per method and ratio**\n\n");
    md.push_str("| method | r |");
    for l in &x_labels {
        md.push_str(&format!(" {l} |"));
    }
    md.push_str(" all |\n|---|---|");
    md.push_str(&"---|".repeat(x_labels.len() + 1));
    md.push('\n');
    let mut imgs = String::new();
    for &r in &report.config.ratios {
        let mut panels = Vec::new();
        for &m in &methods {
            let ratio = if m == "full" { 1.0 } else { r };
            if m == "full" && r != report.config.ratios[0] {
                continue;
            }
            let cells = grid(report, m, ratio);
            let col_mean = |x: usize| {
                let v: Vec<f64> = cells.iter().filter_map(|row| row[x]).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            md.push_str(&format!("| {m} | {ratio} |"));
            for x in 0..x_labels.len() {
                md.push_str(&col_mean(x).map_or(" - |".into(), |v| format!(" {v:.1} |")));
            }
            let all = report
                .rows
                .iter()
                .find(|row| row.method == m && (row.ratio - ratio).abs() < 1e-9)
                .map_or(f64::NAN, |row| row.f1);
            md.push_str(&format!(" {all:.1} |\n"));
            panels.push(HeatPanel {
                title: if m == "full" {
                    "full (uncompressed)".into()
                } else {
                    format!("{m}, r = {r}")
                },
                cells,
            });
        }
        let path = dir.join(format!("needle_r{r}.png"));
        plot_heatmaps(
            &path,
            &format!("Needle F1 (%), depth x length, r = {r} ({})", report.model),
            &panels,
            ("context length (tokens)", &x_labels),
            ("needle depth", &y_labels),
        )?;
        imgs.push_str(&format!("![needle r = {r}](needle_r{r}.png)\n\n"));
    }
    md.push('\n');
    md.push_str(&imgs);
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_on_terminal_punctuation() {
        let s =
            sentences("One two three four. Five six\nseven eight! Tiny. Nine ten eleven twelve?");
        assert_eq!(
            s,
            [
                "One two three four.",
                "Five six seven eight!",
                "Nine ten eleven twelve?"
            ]
        );
    }

    /// Every length gets every kind, whatever the number of lengths, and
    /// counts not divisible by 3 keep the earlier items (kind `i mod 3`).
    #[test]
    fn every_length_gets_every_fact_kind() {
        for n in 1..=7 {
            for c in 0..n {
                let kinds: std::collections::BTreeSet<usize> = (0..9 * n)
                    .filter(|i| i % n == c)
                    .map(|i| kind_index(i, n) % 3)
                    .collect();
                assert_eq!(kinds.len(), 3, "{n} lengths, length {c}: {kinds:?}");
            }
            if !n.is_multiple_of(3) {
                assert!((0..100).all(|i| kind_index(i, n) == i));
            }
        }
    }

    #[test]
    fn facts_cycle_through_kinds_and_hold_their_answer() {
        let mut rng = Rng(SplitMix64::new(1));
        for i in 0..9 {
            let (sentence, question, answer, kind) = fact(&mut rng, i);
            assert!(sentence.contains(&answer), "{sentence} / {answer}");
            assert!(question.ends_with('?'));
            assert_eq!(kind, ["number", "code", "name"][i % 3]);
        }
    }
}
