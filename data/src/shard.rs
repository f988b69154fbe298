//! Deterministic global sharding (Mosaic Streaming's model). Each epoch's
//! order is a seeded permutation of the manifest's rows, fixed by the
//! manifest, the seed and the epoch alone: the row groups are shuffled, cut
//! into blocks of `block_row_groups`, and the rows inside each block are
//! shuffled. Each step takes the next `global_batch` samples of that order
//! and [`rank_slice`] splits them over the ranks present, so the sequence of
//! global batches does not depend on the number of workers, and a cursor
//! saved with N workers resumes with M.

use crate::cursor::Cursor;
use crate::error::{DataError, Result};
use crate::manifest::Manifest;

/// A SplitMix64 generator: tiny, fast, and fixed forever (the permutation
/// must not change with a dependency's version).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// A number in `0..n` (`n > 0`), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A number in `0..n` by remainder (`n` = 0 counts as 1): the draw of
    /// the seeded generators of synthetic data and needle items.
    pub fn below_rem(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A float in `[0, 1)`.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed derived from several values (order matters).
pub fn derive_seed(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x243F_6A88_85A3_08D3u64, |h, &p| mix64(h ^ mix64(p)))
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// One sample of an epoch: which row, and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExampleId {
    /// The row's global index in the manifest (file order, then row): its stable id.
    pub row: u64,
    /// Index of the file in the manifest.
    pub file: u32,
    /// Row group within the file.
    pub row_group: u32,
    /// Row within the row group.
    pub row_in_group: u32,
    /// Epoch of this draw.
    pub epoch: u64,
    /// Position in the epoch's order.
    pub index: u64,
}

impl ExampleId {
    /// The seed for this draw's random choices (ratio, window): depends on
    /// the shuffle seed, epoch and row only.
    pub fn seed(&self, seed: u64) -> u64 {
        derive_seed(&[seed, self.epoch, self.row])
    }
}

/// Row groups laid out in manifest order.
#[derive(Debug, Clone)]
struct RowGroup {
    file: u32,
    group: u32,
    first_row: u64,
    rows: u64,
}

/// Produces global batches from a [`Cursor`]; see the module docs.
#[derive(Debug, Clone)]
pub struct GlobalBatcher {
    groups: Vec<RowGroup>,
    num_rows: u64,
    block_row_groups: usize,
    manifest_hash: String,
    /// The last block materialised: (epoch, block, rows in order).
    block_cache: Option<(u64, usize, Vec<u64>)>,
    /// The current epoch's block layout: (epoch, group order, block start offsets).
    epoch_cache: Option<(u64, Vec<usize>, Vec<u64>)>,
    seed: u64,
}

impl GlobalBatcher {
    /// A batcher over `manifest` with the given shuffle `seed`; rows are
    /// shuffled within blocks of `block_row_groups` row groups (>= 1).
    pub fn new(manifest: &Manifest, seed: u64, block_row_groups: usize) -> Self {
        let mut groups = Vec::new();
        let mut first_row = 0;
        for (fi, f) in manifest.files.iter().enumerate() {
            for (gi, &rows) in f.row_groups.iter().enumerate() {
                groups.push(RowGroup {
                    file: fi as u32,
                    group: gi as u32,
                    first_row,
                    rows,
                });
                first_row += rows;
            }
        }
        Self {
            groups,
            num_rows: first_row,
            block_row_groups: block_row_groups.max(1),
            manifest_hash: manifest.hash(),
            block_cache: None,
            epoch_cache: None,
            seed,
        }
    }

    /// Samples per epoch.
    pub fn epoch_len(&self) -> u64 {
        self.num_rows
    }

    /// A fresh cursor for this batcher's seed and manifest.
    pub fn cursor(&self) -> Cursor {
        Cursor::new(self.seed, self.manifest_hash.clone())
    }

    fn check(&self, c: &Cursor) -> Result<()> {
        if c.manifest_hash != self.manifest_hash {
            return Err(DataError::Cursor(format!(
                "cursor is for manifest {}, dataset has {}",
                c.manifest_hash, self.manifest_hash
            )));
        }
        if c.seed != self.seed {
            return Err(DataError::Cursor(format!(
                "cursor seed {} differs from the configured seed {}",
                c.seed, self.seed
            )));
        }
        if c.sample_index > self.num_rows {
            return Err(DataError::Cursor(format!(
                "sample index {} beyond the epoch's {} samples",
                c.sample_index, self.num_rows
            )));
        }
        Ok(())
    }

    fn ensure_epoch(&mut self, epoch: u64) {
        if matches!(&self.epoch_cache, Some((e, _, _)) if *e == epoch) {
            return;
        }
        let mut order: Vec<usize> = (0..self.groups.len()).collect();
        shuffle(
            &mut order,
            &mut SplitMix64::new(derive_seed(&[self.seed, epoch, 1])),
        );
        let mut starts = vec![0u64];
        for chunk in order.chunks(self.block_row_groups) {
            let n: u64 = chunk.iter().map(|&g| self.groups[g].rows).sum();
            starts.push(starts.last().copied().unwrap_or(0) + n);
        }
        self.epoch_cache = Some((epoch, order, starts));
        self.block_cache = None;
    }

    /// The global row at position `index` of `epoch`.
    fn row_at(&mut self, epoch: u64, index: u64) -> u64 {
        self.ensure_epoch(epoch);
        let Some((_, order, starts)) = &self.epoch_cache else {
            unreachable!("ensure_epoch fills the cache")
        };
        // The block holding `index`: the last start <= index.
        let block = starts.partition_point(|&s| s <= index) - 1;
        let offset = index - starts[block];
        let hit = matches!(&self.block_cache, Some((e, b, _)) if *e == epoch && *b == block);
        if !hit {
            let mut rows = Vec::new();
            let lo = block * self.block_row_groups;
            let hi = (lo + self.block_row_groups).min(order.len());
            for &g in &order[lo..hi] {
                let rg = &self.groups[g];
                rows.extend(rg.first_row..rg.first_row + rg.rows);
            }
            shuffle(
                &mut rows,
                &mut SplitMix64::new(derive_seed(&[self.seed, epoch, 2, block as u64])),
            );
            self.block_cache = Some((epoch, block, rows));
        }
        match &self.block_cache {
            Some((_, _, rows)) => rows[offset as usize],
            None => unreachable!("filled above"),
        }
    }

    /// Locates a global row.
    fn locate(&self, row: u64, epoch: u64, index: u64) -> ExampleId {
        let g = self
            .groups
            .partition_point(|rg| rg.first_row + rg.rows <= row);
        let rg = &self.groups[g];
        ExampleId {
            row,
            file: rg.file,
            row_group: rg.group,
            row_in_group: (row - rg.first_row) as u32,
            epoch,
            index,
        }
    }

    /// The next global batch: up to `global_batch` samples from the cursor,
    /// advancing it. An epoch's last batch may be shorter (batches never
    /// straddle epochs); the call after it starts the next epoch.
    pub fn next_batch(
        &mut self,
        cursor: &mut Cursor,
        global_batch: usize,
    ) -> Result<Vec<ExampleId>> {
        self.check(cursor)?;
        if global_batch == 0 {
            return Err(DataError::Config("global batch must be > 0".into()));
        }
        if self.num_rows == 0 {
            return Err(DataError::Config("the dataset has no rows".into()));
        }
        if cursor.sample_index >= self.num_rows {
            cursor.epoch += 1;
            cursor.sample_index = 0;
        }
        let end = (cursor.sample_index + global_batch as u64).min(self.num_rows);
        let mut out = Vec::with_capacity((end - cursor.sample_index) as usize);
        for index in cursor.sample_index..end {
            let row = self.row_at(cursor.epoch, index);
            out.push(self.locate(row, cursor.epoch, index));
        }
        cursor.sample_index = end;
        Ok(out)
    }
}

/// The contiguous part of a global batch that `rank` of `world` processes
/// when each item has a cost (its tokens): every split point is where the
/// running cost comes closest to that rank's equal share, so each rank's
/// load is within one item of the mean. With at least `world` items every
/// rank gets one or more; with no cost at all this is [`rank_slice`]'s
/// range. Order is kept, and every rank computes the same split.
pub fn balanced_range(costs: &[u64], rank: usize, world: usize) -> std::ops::Range<usize> {
    let n = costs.len();
    if world == 0 || rank >= world {
        return 0..0;
    }
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0u128);
    for &c in costs {
        prefix.push(prefix[prefix.len() - 1] + u128::from(c));
    }
    let total = prefix[n];
    if total == 0 {
        let base = n / world;
        let extra = n % world;
        let start = rank * base + rank.min(extra);
        return start..start + base + usize::from(rank < extra);
    }
    let one_each = n >= world;
    let mut start = 0;
    for r in 1..=world {
        let end = if r == world {
            n
        } else {
            let target = total * r as u128 / world as u128;
            let i = prefix.partition_point(|&p| p < target);
            let closest = if i > 0 && target - prefix[i - 1] <= prefix[i] - target {
                i - 1
            } else {
                i
            };
            let (lo, hi) = if one_each {
                (start + 1, n - (world - r))
            } else {
                (start, n)
            };
            closest.clamp(lo.min(hi), hi)
        };
        if r == rank + 1 {
            return start..end;
        }
        start = end;
    }
    0..0
}

/// The part of a global batch that `rank` of `world` processes: contiguous,
/// balanced (the first `len % world` ranks take one more).
pub fn rank_slice<T>(batch: &[T], rank: usize, world: usize) -> &[T] {
    if world == 0 || rank >= world {
        return &[];
    }
    let base = batch.len() / world;
    let extra = batch.len() % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    &batch[start..start + len]
}
