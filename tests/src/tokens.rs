//! Deterministic pseudo-random token ids for tests.

/// `n` ids in `lo..hi` from a linear congruential generator seeded by `seed`
/// (the same sequence on every machine).
pub fn lcg_tokens(n: usize, seed: u64, lo: u64, hi: u64) -> Vec<u32> {
    let step = |x: u64| {
        x.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    };
    let mut x = step(seed);
    (0..n)
        .map(|_| {
            x = step(x);
            (lo + (x >> 33) % (hi - lo)) as u32
        })
        .collect()
}
