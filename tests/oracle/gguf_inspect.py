"""Oracle for the Rust GGUF reader on real files (tests/tests/gguf.rs).

Usage: gguf_inspect.py FILE.gguf OUT_DIR [TENSOR_NAME ...]

Reads FILE.gguf with gguf-py's GGUFReader and prints one JSON object:
  version, alignment, data_offset,
  metadata: {key: {"type": "UINT32" | ... | "ARRAY", "elem_type": ... (arrays
             only), "value": contents}}  (gguf-py's own GGUF.* pseudo-keys left out),
  tensors:  [{"name", "shape" (PyTorch order: ggml ne[] reversed), "type"
             (ggml name), "type_id", "offset" (relative to the data section),
             "n_bytes"}] in file order.
For each TENSOR_NAME, writes gguf-py's dequantization of that tensor
(`gguf.quants.dequantize`) to OUT_DIR/<TENSOR_NAME>.f32 (little-endian float32).
"""

import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize


def field_json(field):
    main = field.types[0]
    entry = {"type": main.name, "value": field.contents()}
    if main == GGUFValueType.ARRAY:
        # An empty array has no element types recorded by gguf-py.
        entry["elem_type"] = field.types[-1].name if len(field.types) > 1 else None
    return entry


def main():
    path, out = sys.argv[1], Path(sys.argv[2])
    names = sys.argv[3:]
    reader = GGUFReader(path)
    version = int(reader.fields["GGUF.version"].contents())
    metadata = {k: field_json(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [{
        "name": t.name,
        "shape": [int(d) for d in reversed(t.shape.tolist())],
        "type": t.tensor_type.name,
        "type_id": int(t.tensor_type),
        "offset": int(t.data_offset - reader.data_offset),
        "n_bytes": int(t.n_bytes),
    } for t in reader.tensors]
    by_name = {t.name: t for t in reader.tensors}
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        t = by_name[name]
        values = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype="<f4")
        assert values.size == t.n_elements, name
        values.tofile(out / f"{name}.f32")
    print(json.dumps({
        "version": version,
        "alignment": int(reader.alignment),
        "data_offset": int(reader.data_offset),
        "metadata": metadata,
        "tensors": tensors,
    }, allow_nan=False))


if __name__ == "__main__":
    main()
