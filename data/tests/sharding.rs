//! Exactly-once per epoch for 1, 2, 3 and 5 workers; identical global batches
//! across worker counts; resume with a different worker count.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use kvd_data::{
    balanced_range, rank_slice, BuilderConfig, Cursor, Dataset, DatasetOptions, ExampleBuilder,
    ExampleId, GlobalBatcher, Loader, LoaderConfig, Manifest,
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
fn balanced_range_splits_by_cost_in_order() {
    let check = |costs: &[u64], world: usize| -> Vec<std::ops::Range<usize>> {
        let parts: Vec<_> = (0..world)
            .map(|r| balanced_range(costs, r, world))
            .collect();
        // Contiguous and covering, in rank order.
        assert_eq!(parts[0].start, 0);
        assert_eq!(parts[world - 1].end, costs.len());
        for w in parts.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        let total: u64 = costs.iter().sum();
        let largest = costs.iter().max().copied().unwrap_or(0);
        for p in &parts {
            if costs.len() >= world {
                assert!(!p.is_empty(), "{costs:?} over {world}: {parts:?}");
            }
            let load: u64 = costs[p.clone()].iter().sum();
            assert!(
                load <= total / world as u64 + largest,
                "{costs:?} over {world}: {parts:?}"
            );
        }
        parts
    };
    // One long example among short ones gets a rank to itself.
    assert_eq!(check(&[100, 1, 1, 1, 1, 1], 2), [0..1, 1..6]);
    assert_eq!(check(&[1, 1, 1, 1, 1, 100], 2), [0..5, 5..6]);
    // Equal costs: equal counts, to within one.
    let v: Vec<usize> = (0..11).collect();
    for world in 1..=6 {
        let lens: Vec<usize> = check(&[7; 11], world).iter().map(|p| p.len()).collect();
        assert!(
            lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1,
            "{lens:?}"
        );
        // No cost at all (every row skipped): rank_slice's split too.
        let zero = check(&[0; 11], world);
        for (r, p) in zero.iter().enumerate() {
            assert_eq!(&v[p.clone()], rank_slice(&v, r, world));
        }
    }
    // Skewed lengths over several worlds, and fewer items than ranks.
    let costs: Vec<u64> = (0..40u64).map(|i| 50 + (i * 37 % 11) * 90).collect();
    for world in 1..=9 {
        check(&costs, world);
    }
    check(&[5, 9], 4);
    assert_eq!(balanced_range(&[1, 2], 4, 4), 0..0);
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
            // The ranks' parts, in rank order, are the global batch in order,
            // each non-empty and balanced by tokens to within one example.
            let (mut step, mut loads, mut global) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..world {
                let b = loaders[r]
                    .next(&mut cursors[r], r, world)
                    .await
                    .expect("next");
                global = b.global_ids.iter().map(|e| e.row).collect::<Vec<_>>();
                assert!(global.len() < world || !b.examples.is_empty());
                loads.push(
                    b.examples
                        .iter()
                        .map(|e| e.tokens.len())
                        .collect::<Vec<_>>(),
                );
                step.extend(b.examples.iter().map(|e| e.id));
            }
            assert_eq!(step, global);
            let all: Vec<usize> = loads.concat();
            let (total, largest) = (
                all.iter().sum::<usize>(),
                all.iter().max().copied().unwrap_or(0),
            );
            for l in &loads {
                assert!(
                    l.iter().sum::<usize>() <= total / world + largest,
                    "{loads:?}"
                );
            }
            seen.extend(step);
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
