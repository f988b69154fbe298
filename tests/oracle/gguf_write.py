"""Writes small GGUF files with gguf-py's GGUFWriter for the reader tests
(tests/tests/gguf.rs); the Rust side then corrupts copies of them.

Usage: gguf_write.py OUT_DIR

Files:
  small.gguf  arch "test", alignment 64, metadata of several value types and
              three tensors: t.f32 (F32 [3, 64]), t.q8_0 (Q8_0 [2, 64]),
              t.f16 (F16 [4, 32]).
  iq.gguf     t.ok (F32 [2, 32]) and t.iq2 (IQ2_XXS [2, 256], random raw bytes),
              a type the Rust reader knows but cannot dequantize.
Prints JSON: {"<file stem>": {"data_offset": int, "file_len": int,
  "tensors": {name: {"start": abs. offset, "end": abs. end, "values": the
  dequantized values (only for types gguf-py can dequantize)}}}}.
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize


def write(path, fill):
    w = GGUFWriter(path, "test")
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def describe(path):
    r = GGUFReader(path)
    tensors = {}
    for t in r.tensors:
        entry = {"start": int(t.data_offset), "end": int(t.data_offset + t.n_bytes)}
        if t.tensor_type != T.IQ2_XXS:
            entry["values"] = dequantize(t.data, t.tensor_type).reshape(-1).tolist()
        tensors[t.name] = entry
    return {"data_offset": int(r.data_offset), "file_len": int(path.stat().st_size),
            "tensors": tensors}


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)

    def small(w):
        w.add_custom_alignment(64)
        w.add_uint32("test.u32", 7)
        w.add_int8("test.i8", -3)
        w.add_float32("test.f32", 0.5)
        w.add_uint64("test.u64", 2**40)
        w.add_bool("test.bool", True)
        w.add_string("test.name", "h\u00e9llo")
        w.add_array("test.ints", [1, 2, 3])
        w.add_array("test.strs", ["a", "bc"])
        w.add_tensor("t.f32", rng.normal(size=(3, 64)).astype(np.float32))
        q8 = quantize(rng.normal(size=(2, 64)).astype(np.float32), T.Q8_0)
        w.add_tensor("t.q8_0", q8, raw_dtype=T.Q8_0)
        w.add_tensor("t.f16", rng.normal(size=(4, 32)).astype(np.float16))

    def iq(w):
        w.add_tensor("t.ok", np.arange(64, dtype=np.float32).reshape(2, 32))
        raw = rng.integers(0, 256, size=(2, 66), dtype=np.uint8)
        w.add_tensor("t.iq2", raw, raw_dtype=T.IQ2_XXS)

    result = {}
    for stem, fill in [("small", small), ("iq", iq)]:
        path = out / f"{stem}.gguf"
        write(path, fill)
        result[stem] = describe(path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
