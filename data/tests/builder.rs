//! The example builder and padded batches.

mod common;

use std::sync::Arc;

use kvd_data::{
    micro_batches, Batch, BuilderConfig, Example, ExampleBuilder, Location, Record, TextTokenizer,
};

fn b(cfg: BuilderConfig) -> ExampleBuilder {
    ExampleBuilder::new(Arc::new(common::WordTok), cfg).expect("builder")
}

fn loc() -> Location {
    Location::cell("f.parquet", 3, "text")
}

#[test]
fn qa_layout_prefix_span_suffix_answer() {
    let tok = common::WordTok;
    let builder = b(BuilderConfig {
        max_len: 64,
        min_span: 4,
        text_suffix_len: 8,
        ..BuilderConfig::default()
    });
    let rec = Record::Qa {
        context: "a b c d e f".into(),
        question: "who?".into(),
        answers: vec!["x y".into(), "z".into()],
    };
    let e = builder.build(&rec, 9, 1, &loc()).expect("build");
    let q = tok.encode("\n\nQuestion: who?\nAnswer: ").expect("q");
    assert_eq!(e.prefix_len, 1);
    assert_eq!(e.span_len, 6);
    assert_eq!(e.suffix_len, q.len() + 3);
    assert_eq!(e.tokens.len(), e.prefix_len + e.span_len + e.suffix_len);
    assert_eq!(e.tokens[0], 1);
    assert_eq!(&e.tokens[1..7], &tok.encode("a b c d e f").expect("c")[..]);
    let (s, l) = e.answer_span.expect("answer");
    assert_eq!(
        &e.tokens[s..s + l],
        &[&tok.encode("x y").expect("a")[..], &[2]].concat()[..]
    );
    assert_eq!(s + l, e.tokens.len());
    assert!(BuilderConfig::default().ratios.contains(&e.ratio));
}

#[test]
fn qa_examples_locate_their_answers_in_the_span() {
    let builder = b(BuilderConfig {
        max_len: 64,
        min_span: 4,
        text_suffix_len: 8,
        ..BuilderConfig::default()
    });
    let qa = |context: &str, answers: &[&str]| Record::Qa {
        context: context.into(),
        question: "who?".into(),
        answers: answers.iter().map(|a| a.to_string()).collect(),
    };
    // Every occurrence of every answer, in `tokens` positions (BOS first).
    let e = builder
        .build(&qa("a b c d e f b c", &["b c", "f", "zz"]), 1, 1, &loc())
        .expect("build");
    assert_eq!(e.context_answers, vec![(2, 2), (6, 1), (7, 2)]);
    for &(s, n) in &e.context_answers {
        assert!(s >= e.prefix_len && s + n <= e.prefix_len + e.span_len);
    }
    // None found: none listed; text rows have none.
    let e = builder
        .build(&qa("a b c d", &["q"]), 1, 1, &loc())
        .expect("build");
    assert!(e.context_answers.is_empty());
    let text = Record::Text {
        text: (0..40).map(|i| format!("t{i} ")).collect(),
    };
    assert!(builder
        .build(&text, 1, 1, &loc())
        .expect("text")
        .context_answers
        .is_empty());
    // An answer beyond the window (the context is cut to max_len) is not located.
    let small = b(BuilderConfig {
        max_len: 12,
        min_span: 4,
        text_suffix_len: 4,
        ..BuilderConfig::default()
    });
    let long = "a b c d e f g h i j k l m n o p target";
    let e = small
        .build(&qa(long, &["target"]), 1, 1, &loc())
        .expect("build");
    assert!(e.context_answers.is_empty(), "{:?}", e.context_answers);
}

#[test]
fn long_context_is_cut_to_the_window_keeping_the_suffix() {
    let builder = b(BuilderConfig {
        max_len: 32,
        min_span: 4,
        text_suffix_len: 8,
        ..BuilderConfig::default()
    });
    let ctx = (0..100)
        .map(|i| format!("c{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let rec = Record::Qa {
        context: ctx,
        question: "q".into(),
        answers: vec!["a".into()],
    };
    let e = builder.build(&rec, 0, 0, &loc()).expect("build");
    assert_eq!(e.tokens.len(), 32);
    assert_eq!(e.span_len, 32 - 1 - e.suffix_len);
}

#[test]
fn text_window_and_ratio_are_seeded() {
    let cfg = BuilderConfig {
        max_len: 64,
        text_suffix_len: 8,
        text_prefix_max: 4,
        min_span: 8,
        ..BuilderConfig::default()
    };
    let builder = b(cfg);
    let text = (0..500)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let rec = Record::Text { text };
    let a = builder.build(&rec, 0, 11, &loc()).expect("a");
    let a2 = builder.build(&rec, 0, 11, &loc()).expect("a2");
    assert_eq!(a, a2, "same seed, same example");
    assert_eq!(a.tokens.len(), 64);
    assert_eq!(a.suffix_len, 8);
    assert!(a.prefix_len >= 1 && a.prefix_len <= 5);
    assert_eq!(a.prefix_len + a.span_len + a.suffix_len, 64);
    // Different seeds pick different windows/ratios (over 20 seeds, not all equal).
    let outs: Vec<Example> = (0..20)
        .map(|s| builder.build(&rec, 0, s, &loc()).expect("x"))
        .collect();
    assert!(outs.iter().any(|o| o.tokens != a.tokens));
    assert!(outs.iter().any(|o| o.ratio != outs[0].ratio));
}

#[test]
fn short_document_has_no_room_for_span() {
    let builder = b(BuilderConfig {
        max_len: 64,
        text_suffix_len: 8,
        min_span: 8,
        ..BuilderConfig::default()
    });
    let e = builder
        .build(
            &Record::Text {
                text: "one two three".into(),
            },
            0,
            0,
            &loc(),
        )
        .expect_err("short");
    assert!(e.to_string().contains("f.parquet row 3"), "{e}");
}

#[test]
fn multi_question_rows_locate_every_asked_answer() {
    use kvd_data::builder::{earlier_answers, QaTemplate};
    use kvd_data::writer::SourcedRecord;
    let t = QaTemplate::default();
    assert!(earlier_answers("who wrote it?", &t).is_empty());
    // Three questions about one context, combined as train/multiqa combines them.
    let row = |id: &str, q: &str, a: &str| SourcedRecord {
        id: id.into(),
        source: "s".into(),
        record: Record::Qa {
            context: "a b c d e f g h".into(),
            question: q.into(),
            answers: vec![a.into()],
        },
    };
    let rows = [
        row("1", "q1?", "b c"),
        row("2", "q2?", "e"),
        row("3", "q3?", "g h"),
    ];
    let multi = kvd_data::multiqa::multi_question(&rows, 3, &t);
    let Record::Qa { question, .. } = &multi[0].record else {
        panic!("a QA row")
    };
    assert_eq!(earlier_answers(question, &t), ["b c", "e"]);
    let builder = b(BuilderConfig {
        max_len: 64,
        min_span: 4,
        text_suffix_len: 8,
        ..BuilderConfig::default()
    });
    let e = builder
        .build(&multi[0].record, 1, 1, &loc())
        .expect("build");
    // b c at 2..4, e at 5, g h at 7..9 (BOS at 0): the last answer's and the
    // earlier ones'.
    assert_eq!(e.context_answers, vec![(2, 2), (5, 1), (7, 2)]);
    // The single question alone locates only its own answer.
    let e = builder.build(&rows[0].record, 1, 1, &loc()).expect("build");
    assert_eq!(e.context_answers, vec![(2, 2)]);
}

#[test]
fn invalid_config_is_refused() {
    assert!(ExampleBuilder::new(
        Arc::new(common::WordTok),
        BuilderConfig {
            ratios: vec![],
            ..BuilderConfig::default()
        }
    )
    .is_err());
    assert!(ExampleBuilder::new(
        Arc::new(common::WordTok),
        BuilderConfig {
            ratios: vec![1.5],
            ..BuilderConfig::default()
        }
    )
    .is_err());
}

#[test]
fn padding_and_masks() {
    let ex = |id: u64, n: usize, p: usize, s: usize| Example {
        id,
        tokens: (0..n as u32).map(|t| t + 5).collect(),
        prefix_len: p,
        span_len: s,
        suffix_len: n - p - s,
        ratio: 0.5,
        answer_span: Some((n - 2, 2)),
        context_answers: Vec::new(),
    };
    let batch = Batch::pad(&[ex(1, 10, 1, 6), ex(2, 5, 1, 2)], 0, 8);
    assert_eq!(batch.seq_len, 16);
    assert_eq!(batch.input_ids.len(), 32);
    assert_eq!(batch.real_tokens(), 15);
    assert_eq!(&batch.input_ids[16..21], &[5, 6, 7, 8, 9]);
    assert!(batch.input_ids[21..32].iter().all(|&t| t == 0));
    assert_eq!(batch.span_mask[16..32].iter().filter(|&&m| m).count(), 2);
    assert!(batch.suffix_mask[7..10].iter().all(|&m| m) && !batch.suffix_mask[6]);
    assert!(batch.answer_mask[8] && batch.answer_mask[9] && !batch.answer_mask[7]);
    assert_eq!(batch.ids, vec![1, 2]);
    // Bucketing groups similar lengths.
    let exs = vec![
        ex(1, 30, 1, 20),
        ex(2, 5, 1, 2),
        ex(3, 29, 1, 20),
        ex(4, 6, 1, 2),
    ];
    let mb = micro_batches(exs.clone(), 2, true);
    assert_eq!(
        mb.iter()
            .map(|m| m.iter().map(|e| e.id).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        vec![vec![2, 4], vec![3, 1]]
    );
    let mb = micro_batches(exs, 3, false);
    assert_eq!(mb.len(), 2);
    assert_eq!(
        mb[0].iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}
