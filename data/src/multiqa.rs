//! Several questions about one context in one training row (`train/multiqa`):
//! the suffix asks and answers each in turn, so the compressed context must
//! serve all of them, a question-agnostic signal that a single question per
//! row does not give (and the selection loss's target, the suffix's attention,
//! becomes the attention of every question).
//!
//! A row stays an ordinary QA record: its `question` holds the earlier
//! questions with their answers, joined by the QA template, so the example
//! builder's suffix reads `Q: q1 A: a1 Q: q2 A: a2 ...`; the answer is the last
//! question's (what `--answer-only` supervises).

use std::collections::HashMap;

use crate::builder::QaTemplate;
use crate::schema::Record;
use crate::writer::SourcedRecord;

/// Rows of `qa` that share a context, in data order (conversational sets
/// such as CoQA keep their turns in order), combined into rows of 2 to
/// `per_row` questions each; contexts with one question give none. A group
/// of n questions is cut into ⌈n / per_row⌉ rows of nearly equal size.
pub fn multi_question(
    qa: &[SourcedRecord],
    per_row: usize,
    template: &QaTemplate,
) -> Vec<SourcedRecord> {
    let per_row = per_row.max(2);
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, Vec<&SourcedRecord>> = HashMap::new();
    for r in qa {
        let Record::Qa {
            context, answers, ..
        } = &r.record
        else {
            continue;
        };
        if answers.first().is_none_or(|a| a.trim().is_empty()) {
            continue;
        }
        let g = groups.entry(context.as_str()).or_default();
        if g.is_empty() {
            order.push(context);
        }
        g.push(r);
    }
    let mut out = Vec::new();
    for context in order {
        let g = &groups[context];
        if g.len() < 2 {
            continue;
        }
        let parts = g.len().div_ceil(per_row);
        let mut start = 0;
        for p in 0..parts {
            let size = (g.len() - start) / (parts - p);
            out.push(combine(context, &g[start..start + size], template));
            start += size;
        }
    }
    out
}

/// One row asking `rows`' questions (at least 2) in turn about `context`.
fn combine(context: &str, rows: &[&SourcedRecord], template: &QaTemplate) -> SourcedRecord {
    let qa = |r: &SourcedRecord| match &r.record {
        Record::Qa {
            question, answers, ..
        } => (question.clone(), answers.clone()),
        Record::Text { .. } => unreachable!("grouped rows are QA rows"),
    };
    let mut question = String::new();
    let (last, earlier) = rows.split_last().expect("at least two rows");
    for r in earlier {
        let (q, a) = qa(r);
        question.push_str(&q);
        question.push_str(&template.answer_prefix);
        question.push_str(&a[0]);
        question.push_str(&template.question_prefix);
    }
    let (q, answers) = qa(last);
    question.push_str(&q);
    SourcedRecord {
        id: format!("multi/{}+{}", rows[0].id, rows.len() - 1),
        source: format!("{}+multi", rows[0].source),
        record: Record::Qa {
            context: context.to_string(),
            question,
            answers,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, context: &str, q: &str, a: &str) -> SourcedRecord {
        SourcedRecord {
            id: id.into(),
            source: "src".into(),
            record: Record::Qa {
                context: context.into(),
                question: q.into(),
                answers: vec![a.into(), format!("{a} (alt)")],
            },
        }
    }

    #[test]
    fn questions_about_one_context_share_a_row_in_order() {
        let mut rows = vec![row("a1", "A", "qa1?", "x1")];
        rows.push(row("b1", "B", "qb1?", "y1"));
        rows.push(row("a2", "A", "qa2?", "x2"));
        rows.push(row("c1", "C", "qc1?", "z1"));
        for i in 3..=7 {
            rows.push(row(
                &format!("a{i}"),
                "A",
                &format!("qa{i}?"),
                &format!("x{i}"),
            ));
        }
        rows.push(row("b2", "B", "qb2?", ""));
        let t = QaTemplate::default();
        let out = multi_question(&rows, 3, &t);
        // A: 7 questions -> 3 rows of 2, 2, 3; B: one answered question; C: one.
        let qs: Vec<(&str, &str, Vec<String>)> = out
            .iter()
            .map(|r| match &r.record {
                Record::Qa {
                    context,
                    question,
                    answers,
                } => (context.as_str(), question.as_str(), answers.clone()),
                Record::Text { .. } => panic!("qa"),
            })
            .collect();
        assert_eq!(qs.len(), 3, "{qs:?}");
        assert_eq!(qs[0].0, "A");
        assert_eq!(qs[0].1, "qa1?\nAnswer: x1\n\nQuestion: qa2?");
        assert_eq!(qs[0].2, ["x2", "x2 (alt)"], "the last question's answers");
        assert_eq!(qs[1].1, "qa3?\nAnswer: x3\n\nQuestion: qa4?");
        assert_eq!(
            qs[2].1,
            "qa5?\nAnswer: x5\n\nQuestion: qa6?\nAnswer: x6\n\nQuestion: qa7?"
        );
        assert_eq!(out[0].id, "multi/a1+1");
        assert_eq!(out[2].source, "src+multi");
        // The builder's suffix: template + question + template + answer.
        let suffix = format!(
            "{}{}{}{}",
            t.question_prefix, qs[0].1, t.answer_prefix, qs[0].2[0]
        );
        assert_eq!(
            suffix,
            "\n\nQuestion: qa1?\nAnswer: x1\n\nQuestion: qa2?\nAnswer: x2"
        );
        assert!(multi_question(&rows[..2], 3, &t).is_empty());
    }
}
