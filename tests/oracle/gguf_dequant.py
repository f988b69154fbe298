"""Oracle for the Rust ggml dequantizer (tests/tests/gguf.rs).

Usage: gguf_dequant.py OUT_DIR [SEED]

For every ggml type the Rust side can dequantize, writes random raw tensor
data to OUT_DIR/<TYPE>.bin and gguf-py's dequantization of it
(`gguf.quants.dequantize`, a numpy port of ggml-quants.c) to
OUT_DIR/<TYPE>.f32 (little-endian float32). Prints a JSON manifest:
[{"type": "Q4_K", "id": 12, "n_elements": N, "n_bytes": B}, ...].

Quantized blocks are random bytes, except that their f16 scale fields
(d, dmin / m) are overwritten with finite, moderate random values, so no
result is NaN or inf. Plain F32/F16/BF16 data is random finite values plus a
few special ones (signed zero, subnormals, infinities, extremes).

Q8_K is not in gguf-py; its reference is ggml's formula y = d * q, computed
here in float32 numpy (one multiply per element, so it is exact as well).
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

# Byte offsets of the f16 scale fields inside one block (ggml-common.h).
F16_FIELDS = {
    T.Q4_0: [0],  # d
    T.Q4_1: [0, 2],  # d, m
    T.Q5_0: [0],  # d
    T.Q5_1: [0, 2],  # d, m
    T.Q8_0: [0],  # d
    T.Q2_K: [80, 82],  # d, dmin after scales[16], qs[64]
    T.Q3_K: [108],  # d after hmask[32], qs[64], scales[12]
    T.Q4_K: [0, 2],  # d, dmin
    T.Q5_K: [0, 2],  # d, dmin
    T.Q6_K: [208],  # d after ql[128], qh[64], scales[16]
}

# A multiple of 256 (k-quant super-block) large enough that the Rust side
# splits it over threads (it does so above 2**17 elements per thread).
N_ELEMENTS = 2**18 + 3 * 256


def specials(dtype):
    """Signed zeros, subnormals, infinities and extremes of a float type."""
    fi = np.finfo(dtype)
    vals = [0.0, -0.0, float(fi.smallest_subnormal), -float(fi.smallest_subnormal),
            float(fi.tiny), float(fi.max), -float(fi.max), np.inf, -np.inf, 1.0, -2.5]
    return np.array(vals, dtype=dtype)


def plain(qtype, rng):
    """Raw bytes of N_ELEMENTS random finite F32/F16/BF16 values (+ specials)."""
    x = rng.normal(0.0, 3.0, N_ELEMENTS).astype(np.float32)
    x[: 16] *= np.float32(1e-40)  # f32 subnormals
    if qtype == T.F32:
        x[-11:] = specials(np.float32)
        return x.view(np.uint8)
    if qtype == T.F16:
        h = x.astype(np.float16)
        h[-11:] = specials(np.float16)
        return h.view(np.uint8)
    # BF16: the upper 16 bits of float32 values (no NaNs), plus specials.
    x[-11:] = specials(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def quantized(qtype, rng):
    """Raw bytes of random blocks with finite f16 (or, for Q8_K, f32) scales."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = N_ELEMENTS // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == T.Q8_K:
        d = rng.normal(0.0, 0.01, (n_blocks, 1)).astype(np.float32)
        blocks[:, 0:4] = d.view(np.uint8)
        return blocks.reshape(-1)
    for off in F16_FIELDS[qtype]:
        scale = rng.normal(0.0, 0.05, (n_blocks, 1)).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8)
    return blocks.reshape(-1)


def reference(qtype, raw):
    if qtype == T.Q8_K:
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        d = blocks[:, 0:4].copy().view(np.float32)
        q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)
    return dequantize(raw, qtype).reshape(-1)


def main():
    out = Path(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1234
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    types = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
             T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K]
    for qtype in types:
        raw = plain(qtype, rng) if qtype in (T.F32, T.F16, T.BF16) else quantized(qtype, rng)
        ref = np.ascontiguousarray(reference(qtype, raw), dtype="<f4")
        assert ref.size == N_ELEMENTS, (qtype.name, ref.size)
        assert not np.isnan(ref).any(), qtype.name
        raw.tofile(out / f"{qtype.name}.bin")
        ref.tofile(out / f"{qtype.name}.f32")
        manifest.append({"type": qtype.name, "id": int(qtype), "n_elements": N_ELEMENTS,
                         "n_bytes": int(raw.size)})
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
