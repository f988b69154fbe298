//! Dequantization of ggml tensor data to f32, bit-for-bit like ggml's
//! `dequantize_row_*` in ggml-quants.c (and gguf-py's `gguf.quants`).
//!
//! Every kernel does the same float operations in the same order as the C
//! reference (no fused multiply-add), so the results are identical.

use std::sync::{Mutex, OnceLock, PoisonError};

use half::f16;

use super::error::GgufError;
use super::types::{GgmlType, QK_K};

/// Below this many elements per thread, splitting the work is not worth a thread.
const MIN_ELEMS_PER_THREAD: usize = 1 << 17;

/// A kernel that decodes whole blocks: `data.len() == n * type_size`,
/// `out.len() == n * block_size`.
type Kernel = fn(&[u8], &mut [f32]);

/// Decodes `data`, the raw bytes of `out.len()` elements of type `dtype`, into `out`.
///
/// Supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
/// Q4_K, Q5_K, Q6_K, Q8_K (see [`GgmlType::can_dequantize`]). `out.len()` must
/// be a multiple of the type's block size and `data.len()` exactly the bytes of
/// that many blocks. Large inputs are split over threads.
pub fn dequantize(dtype: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    let unsupported = || GgufError::UnsupportedType {
        dtype: dtype.to_string(),
    };
    let kernel = kernel_for(dtype).ok_or_else(unsupported)?;
    let (bs, ts) = dtype
        .block_size()
        .zip(dtype.type_size())
        .ok_or_else(unsupported)?;
    let mismatch = |what: String| GgufError::LengthMismatch {
        dtype: dtype.to_string(),
        what,
    };
    if !out.len().is_multiple_of(bs) {
        return Err(mismatch(format!(
            "{} output elements are not a multiple of the block size {bs}",
            out.len()
        )));
    }
    let n_blocks = out.len() / bs;
    let expected = n_blocks
        .checked_mul(ts)
        .ok_or_else(|| mismatch(format!("{} elements overflow the byte count", out.len())))?;
    if data.len() != expected {
        return Err(mismatch(format!(
            "{} bytes of data for {} elements, expected {expected}",
            data.len(),
            out.len()
        )));
    }

    let threads = match out.len() / MIN_ELEMS_PER_THREAD {
        0 | 1 => 1,
        n => n.min(max_threads()),
    };
    if threads == 1 {
        kernel(data, out);
        return Ok(());
    }
    // A few parts per thread, handed out through a queue: the threads balance
    // their load, and if the OS refuses a thread the others (at least this
    // one) still do all the work.
    let blocks_per_part = n_blocks.div_ceil(threads * 4).max(1);
    let parts: Vec<(&[u8], &mut [f32])> = data
        .chunks(blocks_per_part * ts)
        .zip(out.chunks_mut(blocks_per_part * bs))
        .collect();
    let queue = Mutex::new(parts);
    let work = || loop {
        let part = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
        match part {
            Some((d, o)) => kernel(d, o),
            None => break,
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            if let Err(e) = std::thread::Builder::new().spawn_scoped(scope, work) {
                tracing::debug!("dequantize: cannot spawn a thread ({e}); using fewer");
                break;
            }
        }
        work();
    });
    Ok(())
}

/// The number of CPUs to use, looked up once (it reads cgroup files on Linux).
fn max_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn kernel_for(dtype: GgmlType) -> Option<Kernel> {
    Some(match dtype {
        GgmlType::F32 => f32_kernel,
        GgmlType::F16 => f16_kernel,
        GgmlType::BF16 => bf16_kernel,
        GgmlType::Q4_0 => |d, o| blocks::<18, 32>(d, o, q4_0),
        GgmlType::Q4_1 => |d, o| blocks::<20, 32>(d, o, q4_1),
        GgmlType::Q5_0 => |d, o| blocks::<22, 32>(d, o, q5_0),
        GgmlType::Q5_1 => |d, o| blocks::<24, 32>(d, o, q5_1),
        GgmlType::Q8_0 => |d, o| blocks::<34, 32>(d, o, q8_0),
        GgmlType::Q2K => |d, o| blocks::<84, QK_K>(d, o, q2_k),
        GgmlType::Q3K => |d, o| blocks::<110, QK_K>(d, o, q3_k),
        GgmlType::Q4K => |d, o| blocks::<144, QK_K>(d, o, q4_k),
        GgmlType::Q5K => |d, o| blocks::<176, QK_K>(d, o, q5_k),
        GgmlType::Q6K => |d, o| blocks::<210, QK_K>(d, o, q6_k),
        GgmlType::Q8K => |d, o| blocks::<292, QK_K>(d, o, q8_k),
        _ => return None,
    })
}

/// Runs `f` on each (block bytes, block output) pair as fixed-size arrays,
/// which lets the compiler drop bounds checks inside the kernels.
#[inline(always)]
fn blocks<const TS: usize, const BS: usize>(
    data: &[u8],
    out: &mut [f32],
    f: fn(&[u8; TS], &mut [f32; BS]),
) {
    for (b, y) in data.chunks_exact(TS).zip(out.chunks_exact_mut(BS)) {
        // chunks_exact yields exactly TS / BS elements, so these conversions cannot fail.
        if let (Ok(b), Ok(y)) = (<&[u8; TS]>::try_from(b), <&mut [f32; BS]>::try_from(y)) {
            f(b, y);
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn f32_kernel(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(4).zip(out.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn f16_kernel(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(2).zip(out.iter_mut()) {
        *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

fn bf16_kernel(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(2).zip(out.iter_mut()) {
        *y = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

/// `block_q4_0 { half d; u8 qs[16]; }`: y = (q - 8) * d.
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = f32::from(i16::from(q & 0x0F) - 8) * d;
        y[j + 16] = f32::from(i16::from(q >> 4) - 8) * d;
    }
}

/// `block_q4_1 { half d; half m; u8 qs[16]; }`: y = q * d + m.
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = f32::from(q & 0x0F) * d + m;
        y[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// `block_q5_0 { half d; u8 qh[4]; u8 qs[16]; }`: y = (q - 16) * d, bit 4 of q from qh.
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = f32::from(i16::from((q & 0x0F) | xh0) - 16) * d;
        y[j + 16] = f32::from(i16::from((q >> 4) | xh1) - 16) * d;
    }
}

/// `block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; }`: y = q * d + m.
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = f32::from((q & 0x0F) | xh0) * d + m;
        y[j + 16] = f32::from((q >> 4) | xh1) * d + m;
    }
}

/// `block_q8_0 { half d; i8 qs[32]; }`: y = q * d.
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = f32::from(b[2 + j] as i8) * d;
    }
}

/// `block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin; }`.
fn q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let (scales, rest) = b.split_at(16);
    let (qs, dd) = rest.split_at(64);
    let d = f16_at(dd, 0);
    let min = f16_at(dd, 2);
    let mut is = 0;
    let mut out = 0;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in [0usize, 16] {
                let sc = scales[is];
                is += 1;
                let dl = d * f32::from(sc & 0x0F);
                let ml = min * f32::from(sc >> 4);
                for l in 0..16 {
                    y[out + l] = dl * f32::from((q[half + l] >> shift) & 3) - ml;
                }
                out += 16;
            }
        }
    }
}

/// `block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d; }`.
fn q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let (hm, rest) = b.split_at(32);
    let (qs, rest) = rest.split_at(64);
    let (sc, dd) = rest.split_at(12);
    let d_all = f16_at(dd, 0);
    // 16 six-bit scales: low 4 bits in sc[0..8] (two per byte), high 2 bits in sc[8..12].
    let mut scales = [0i32; 16];
    for (j, s) in scales.iter_mut().enumerate() {
        let low = if j < 8 { sc[j] & 0x0F } else { sc[j - 8] >> 4 };
        let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        *s = i32::from(low | (high << 4)) - 32;
    }
    let mut is = 0;
    let mut out = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in [0usize, 16] {
                let dl = d_all * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let low = i32::from((q[half + l] >> shift) & 3);
                    let sub = if hm[half + l] & m != 0 { 0 } else { 4 };
                    y[out + l] = dl * (low - sub) as f32;
                }
                out += 16;
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// ggml's `get_scale_min_k4`: the j-th 6-bit (scale, min) pair of Q4_K/Q5_K.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; }`.
fn q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let q = &qs[32 * c..32 * c + 32];
        let o = 64 * c;
        for l in 0..32 {
            y[o + l] = d1 * f32::from(q[l] & 0x0F) - m1;
            y[o + 32 + l] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// `block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }`.
fn q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let q = &qs[32 * c..32 * c + 32];
        let o = 64 * c;
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[o + l] = d1 * f32::from((q[l] & 0x0F) + h1) - m1;
            y[o + 32 + l] = d2 * f32::from((q[l] >> 4) + h2) - m2;
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d; }`.
fn q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let o = 128 * n;
        for l in 0..32 {
            let is = l / 16;
            let q1 = i16::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i16::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i16::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i16::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            // ggml: d * sc[i] * q, evaluated left to right.
            y[o + l] = d * f32::from(sc[is] as i8) * f32::from(q1);
            y[o + l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
            y[o + l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
            y[o + l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
        }
    }
}

/// `block_q8_K { float d; i8 qs[256]; i16 bsums[16]; }`: y = d * q.
fn q8_k(b: &[u8; 292], y: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..QK_K {
        y[j] = d * f32::from(b[4 + j] as i8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_lengths_and_types() {
        let mut out = vec![0f32; 32];
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out).is_ok());
        let err = dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out).unwrap_err();
        assert!(matches!(err, GgufError::LengthMismatch { .. }), "{err}");
        let mut odd = vec![0f32; 31];
        let err = dequantize(GgmlType::Q4_0, &[0u8; 18], &mut odd).unwrap_err();
        assert!(matches!(err, GgufError::LengthMismatch { .. }), "{err}");
        let err = dequantize(GgmlType::IQ2XXS, &[0u8; 66], &mut vec![0f32; 256]).unwrap_err();
        assert!(err.to_string().contains("IQ2_XXS"), "{err}");
        let err = dequantize(GgmlType::Other(77), &[], &mut []).unwrap_err();
        assert!(err.to_string().contains("type#77"), "{err}");
    }

    #[test]
    fn simple_blocks() {
        // Q8_0 with d = 0.5 (f16 0x3800): y = q / 2.
        let mut b = vec![0x00, 0x38];
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = vec![0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut out).unwrap();
        let want: Vec<f32> = (0..32).map(|i| (i - 16) as f32 * 0.5).collect();
        assert_eq!(out, want);
        // Q4_0 with d = 1: low nibbles first, then high nibbles, minus 8.
        let mut b = vec![0x00, 0x3c];
        b.extend((0..16).map(|i| (i as u8) | ((15 - i as u8) << 4)));
        dequantize(GgmlType::Q4_0, &b, &mut out).unwrap();
        let want: Vec<f32> = (0..16)
            .chain((0..16).rev())
            .map(|i| (i - 8) as f32)
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn threaded_equals_serial() {
        // Enough Q4_K blocks to be split over threads; compare with block-by-block decoding.
        let n_blocks = 4 * MIN_ELEMS_PER_THREAD / QK_K + 3;
        let mut data = vec![0u8; n_blocks * 144];
        let mut x = 0x1234_5678u32;
        for (i, byte) in data.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Keep the f16 d / dmin fields finite (exponent bits not all ones).
            *byte = if i % 144 == 1 || i % 144 == 3 {
                (x as u8) & 0x3b
            } else {
                x as u8
            };
        }
        let mut par = vec![0f32; n_blocks * QK_K];
        dequantize(GgmlType::Q4K, &data, &mut par).unwrap();
        let mut ser = vec![0f32; n_blocks * QK_K];
        for (d, o) in data.chunks(144).zip(ser.chunks_mut(QK_K)) {
            dequantize(GgmlType::Q4K, d, o).unwrap();
        }
        assert!(par
            .iter()
            .zip(&ser)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
