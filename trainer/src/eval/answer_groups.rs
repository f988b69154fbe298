//! A method's results grouped by how much of the answer's context tokens it
//! kept (none, part, all), beside the uncompressed model on the same
//! questions: does a method answer when it dropped the answer whole (its
//! content carried into the kept tokens), and what does it lose when it kept it?

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

use super::run::EvalRow;

/// One question's scores under one method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuestionScore {
    /// F1, percent.
    pub f1: f64,
    /// Whether the generation contains a gold answer.
    pub contains: bool,
    /// Teacher-forced NLL of the answer (nats/token).
    pub nll: f64,
}

/// The questions of one group, as means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerGroup {
    /// How much of the answer was kept: `none`, `part` or `all`.
    pub kept: String,
    /// Questions in the group.
    pub questions: usize,
    /// F1, percent.
    pub f1: f64,
    /// Containment accuracy, percent.
    pub contains: f64,
    /// Answer NLL (nats/token).
    pub answer_nll: f64,
    /// The uncompressed model's F1 on the same questions.
    pub full_f1: f64,
    /// The uncompressed model's answer NLL on the same questions.
    pub full_answer_nll: f64,
}

/// The groups' names, in order.
const GROUPS: [&str; 3] = ["none", "part", "all"];

/// Which group a kept share in [0, 1] falls in.
fn group_of(share: f64) -> usize {
    if share <= 0.0 {
        0
    } else if share >= 1.0 {
        2
    } else {
        1
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Sum {
    n: usize,
    f1: f64,
    contains: usize,
    nll: f64,
    full_f1: f64,
    full_nll: f64,
}

/// Running sums of the three groups of one method and ratio.
#[derive(Debug, Default, Clone)]
pub struct GroupSums([Sum; 3]);

impl GroupSums {
    /// Adds a question whose answer's tokens were kept at `share`, scored
    /// `own` by the method and `full` by the uncompressed model.
    pub fn add(&mut self, share: f64, own: QuestionScore, full: QuestionScore) {
        let s = &mut self.0[group_of(share)];
        s.n += 1;
        s.f1 += own.f1;
        s.contains += usize::from(own.contains);
        s.nll += own.nll;
        s.full_f1 += full.f1;
        s.full_nll += full.nll;
    }

    /// The non-empty groups' means, none to all.
    pub fn groups(&self) -> Vec<AnswerGroup> {
        GROUPS
            .iter()
            .zip(&self.0)
            .filter(|(_, s)| s.n > 0)
            .map(|(name, s)| {
                let n = s.n as f64;
                AnswerGroup {
                    kept: (*name).to_string(),
                    questions: s.n,
                    f1: s.f1 / n,
                    contains: 100.0 * s.contains as f64 / n,
                    answer_nll: s.nll / n,
                    full_f1: s.full_f1 / n,
                    full_answer_nll: s.full_nll / n,
                }
            })
            .collect()
    }
}

/// The Markdown table of every row's groups (empty when no row has any).
pub fn markdown(rows: &[EvalRow]) -> String {
    let mut out = String::new();
    if rows.iter().all(|r| r.by_answer_kept.is_empty()) {
        return out;
    }
    out.push_str(
        "**By how much of the answer's context tokens were kept** \
         (the uncompressed model on the same questions beside)\n\n",
    );
    out.push_str(
        "| method | r | answer kept | questions | F1 | containment (%) | answer NLL | uncompressed F1 / NLL |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        for g in &r.by_answer_kept {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.1} / {:.3} |",
                r.method,
                r.ratio,
                g.kept,
                g.questions,
                g.f1,
                g.contains,
                g.answer_nll,
                g.full_f1,
                g.full_answer_nll
            );
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(f1: f64, contains: bool, nll: f64) -> QuestionScore {
        QuestionScore { f1, contains, nll }
    }

    #[test]
    fn questions_fall_in_their_group_and_average_there() {
        let mut g = GroupSums::default();
        g.add(0.0, q(10.0, false, 6.0), q(20.0, true, 4.0));
        g.add(0.0, q(30.0, true, 5.0), q(40.0, true, 3.0));
        g.add(1.0, q(50.0, true, 2.0), q(60.0, false, 2.5));
        let got = g.groups();
        assert_eq!(got.len(), 2, "the empty `part` group is left out: {got:?}");
        assert_eq!(
            got[0],
            AnswerGroup {
                kept: "none".into(),
                questions: 2,
                f1: 20.0,
                contains: 50.0,
                answer_nll: 5.5,
                full_f1: 30.0,
                full_answer_nll: 3.5,
            }
        );
        assert_eq!((got[1].kept.as_str(), got[1].questions), ("all", 1));
        assert_eq!(group_of(0.5), 1);
        assert_eq!(group_of(1e-9), 1);
    }
}
