//! Exactly-once per epoch for 1, 2, 3 and 5 workers; identical global batches
//! across worker counts; resume with a different worker count.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use kvd_data::{
    rank_slice, BuilderConfig, Cursor, Dataset, DatasetOptions, ExampleBuilder, ExampleId,
    GlobalBatcher, Loader, LoaderConfig, Manifest,
};

const ROWS: &[usize] = &[37, 50, 13, 61];

fn manifest_sync() -> (common::Source2, Manifest) {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let src = common::memory();
    let m = rt.block_on(common::write_qa_dataset(&src, ROWS, 7));
    (common::Source2(src, rt), m)
}

/// The global batches of epoch 0 with `world` ranks: per step, the ranks'
/// slices concatenated.
fn epoch_by_ranks(m: &Manifest, world: usize, gb: usize) -> Vec<Vec<ExampleId>> {
    let mut batchers: Vec<GlobalBatcher> =
        (0..world).map(|_| GlobalBatcher::new(m, 42, 3)).collect();
    let mut cursors: Vec<Cursor> = batchers.iter().map(|b| b.cursor()).collect();
    let mut steps = Vec::new();
    loop {
        let mut step = Vec::new();
        for r in 0..world {
            let g = batchers[r].next_batch(&mut cursors[r], gb).expect("batch");
            step.extend_from_slice(rank_slice(&g, r, world));
        }
        steps.push(step);
        if cursors[0].sample_index >= m.num_rows() {
            break;
        }
    }
    steps
}

#[test]
fn exactly_once_for_1_2_3_5_workers_and_same_sequence() {
    let (_keep, m) = manifest_sync();
    let total = m.num_rows() as usize;
    assert_eq!(total, ROWS.iter().sum::<usize>());
    let reference = epoch_by_ranks(&m, 1, 16);
    for world in [1, 2, 3, 5] {
        let steps = epoch_by_ranks(&m, world, 16);
        let ids: Vec<u64> = steps.iter().flatten().map(|e| e.row).collect();
        let uniq: HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(ids.len(), total, "world {world}: every row once");
        assert_eq!(uniq.len(), total, "world {world}: no repeats");
        assert_eq!(steps, reference, "world {world}: same global batches");
    }
    // Shuffled: not the identity order.
    let flat: Vec<u64> = reference.iter().flatten().map(|e| e.row).collect();
    assert_ne!(flat, (0..total as u64).collect::<Vec<_>>());
}

#[test]
fn epochs_differ_and_seed_matters() {
    let (_keep, m) = manifest_sync();
    let mut b = GlobalBatcher::new(&m, 42, 3);
    let mut c = b.cursor();
    let n = m.num_rows() as usize;
    let e0: Vec<u64> = b
        .next_batch(&mut c, n)
        .expect("e0")
        .iter()
        .map(|e| e.row)
        .collect();
    let e1: Vec<u64> = b
        .next_batch(&mut c, n)
        .expect("e1")
        .iter()
        .map(|e| e.row)
        .collect();
    assert_eq!(c.epoch, 1);
    assert_ne!(e0, e1);
    let mut sorted = e1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..n as u64).collect::<Vec<_>>());
    let mut b7 = GlobalBatcher::new(&m, 7, 3);
    let mut c7 = b7.cursor();
    let s7: Vec<u64> = b7
        .next_batch(&mut c7, n)
        .expect("s7")
        .iter()
        .map(|e| e.row)
        .collect();
    assert_ne!(e0, s7);
}

#[test]
fn resume_with_a_different_worker_count() {
    let (_keep, m) = manifest_sync();
    let gb = 10;
    // Uninterrupted: 2 epochs with 3 workers.
    let mut b = GlobalBatcher::new(&m, 42, 3);
    let mut c = b.cursor();
    let mut full = Vec::new();
    while c.epoch < 2 {
        let g = b.next_batch(&mut c, gb).expect("batch");
        full.push(g);
        if c.epoch == 1 && c.sample_index >= m.num_rows() {
            break;
        }
    }
    for stop in [1usize, 7, 17, 20] {
        // Run `stop` steps with 3 workers, save the cursor as JSON...
        let mut b3 = GlobalBatcher::new(&m, 42, 3);
        let mut c3 = b3.cursor();
        for _ in 0..stop {
            b3.next_batch(&mut c3, gb).expect("batch");
        }
        let saved = serde_json::to_string(&c3).expect("json");
        // ...and resume with 5 workers in a fresh process state.
        let restored: Cursor = serde_json::from_str(&saved).expect("parse");
        let world = 5;
        let mut bs: Vec<GlobalBatcher> =
            (0..world).map(|_| GlobalBatcher::new(&m, 42, 3)).collect();
        let mut cs = vec![restored; world];
        for expected in &full[stop..] {
            let mut step = Vec::new();
            for r in 0..world {
                let g = bs[r].next_batch(&mut cs[r], gb).expect("batch");
                step.extend_from_slice(rank_slice(&g, r, world));
            }
            assert_eq!(&step, expected, "stop at {stop}");
        }
    }
}

#[test]
fn cursor_for_another_manifest_or_seed_is_refused() {
    let (_keep, m) = manifest_sync();
    let mut b = GlobalBatcher::new(&m, 42, 3);
    let mut wrong = Cursor::new(42, "not-this-manifest");
    let e = b.next_batch(&mut wrong, 4).expect_err("manifest mismatch");
    assert!(e.to_string().contains("not-this-manifest"), "{e}");
    let mut wrong_seed = Cursor::new(43, m.hash());
    assert!(b.next_batch(&mut wrong_seed, 4).is_err());
}

#[test]
fn rank_slice_is_balanced_and_covering() {
    let v: Vec<usize> = (0..11).collect();
    for world in 1..=6 {
        let parts: Vec<&[usize]> = (0..world).map(|r| rank_slice(&v, r, world)).collect();
        assert_eq!(parts.concat(), v);
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert!(lens.iter().max().unwrap_or(&0) - lens.iter().min().unwrap_or(&0) <= 1);
    }
}

#[test]
fn loader_reads_every_row_once_across_ranks() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let src = common::memory();
        let m = common::write_qa_dataset(&src, ROWS, 7).await;
        let ds = Arc::new(
            Dataset::from_parts(src, m.clone(), DatasetOptions::default())
                .await
                .expect("open"),
        );
        let world = 3;
        let mut seen = Vec::new();
        let mut loaders: Vec<Loader> = (0..world)
            .map(|_| {
                let b = Arc::new(
                    ExampleBuilder::new(
                        Arc::new(common::WordTok),
                        BuilderConfig {
                            max_len: 256,
                            ..BuilderConfig::default()
                        },
                    )
                    .expect("builder"),
                );
                Loader::new(
                    ds.clone(),
                    b,
                    LoaderConfig {
                        global_batch: 16,
                        seed: 3,
                        block_row_groups: 2,
                        prefetch_batches: 1,
                    },
                )
            })
            .collect();
        let mut cursors: Vec<Cursor> = loaders.iter().map(|l| l.cursor()).collect();
        while cursors[0].sample_index < m.num_rows() {
            for r in 0..world {
                let b = loaders[r]
                    .next(&mut cursors[r], r, world)
                    .await
                    .expect("next");
                let want: Vec<u64> = rank_slice(&b.global_ids, r, world)
                    .iter()
                    .map(|e| e.row)
                    .collect();
                let got: Vec<u64> = b.examples.iter().map(|e| e.id).collect();
                assert_eq!(got, want);
                seen.extend(got);
            }
        }
        seen.sort();
        assert_eq!(seen, (0..m.num_rows()).collect::<Vec<_>>());
        // Each example's content is its own row (ids map to the right records).
        let ids: Vec<ExampleId> = GlobalBatcher::new(&m, 3, 2)
            .next_batch(&mut loaders[0].cursor(), 20)
            .expect("b");
        for (id, rec) in ds.read(&ids).await.expect("read") {
            assert_eq!(common::row_number(&rec.expect("record")) as u64, id.row);
        }
    });
}
