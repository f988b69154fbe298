//! The GGUF reader (`kvd_trainer::gguf`) against gguf-py.
//!
//! * `dequant_*`: every supported ggml type, random blocks, bit-exact against
//!   `gguf.quants.dequantize` (oracle `gguf_dequant.py`).
//! * `real_*`: the real SmolLM2 and Gemma-3 GGUFs: metadata, tensor table and
//!   dequantized tensors of every type they hold, against `GGUFReader`
//!   (oracle `gguf_inspect.py`).
//! * `small_*`, `bad_*`, `truncated_*`, ...: small files written by
//!   `GGUFWriter` (oracle `gguf_write.py`) and corrupted copies of them, plus
//!   hand-built headers; each must give the right error, naming file and
//!   tensor/key, and never panic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kvd_tests::env::{gemma3_gguf, run_oracle, smollm2_gguf};
use kvd_trainer::gguf::{dequantize, GgmlType, GgufError, GgufFile, GgufValue};
use serde_json::Value;

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len() % 4, 0, "{}", path.display());
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Asserts that two f32 slices are identical bit for bit.
fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        let max_diff = bad
            .iter()
            .map(|&i| (got[i] - want[i]).abs())
            .fold(0f32, f32::max);
        panic!(
            "{what}: {} of {} values differ (max abs diff {max_diff}); first at {i}: got {} want {}",
            bad.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("non-UTF-8 temp path")
}

/// Asserts that `err`'s message names every one of `parts`.
fn assert_names(err: &GgufError, parts: &[&str]) {
    let msg = err.to_string();
    for part in parts {
        assert!(msg.contains(part), "error {msg:?} does not name {part:?}");
    }
}

// ---------------------------------------------------------------- dequantize

#[test]
fn dequant_every_type_matches_gguf_py_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_oracle("gguf_dequant.py", &[path_str(dir.path())]);
    let manifest: Vec<Value> = serde_json::from_str(&out).unwrap();

    // The oracle must cover every type the reader claims to dequantize.
    let covered: BTreeSet<u32> = manifest
        .iter()
        .map(|e| e["id"].as_u64().unwrap() as u32)
        .collect();
    for id in 0..64 {
        let t = GgmlType::from_id(id);
        assert_eq!(
            t.can_dequantize(),
            covered.contains(&id),
            "type {t} (id {id}): dequantizable vs covered by the oracle"
        );
    }

    for entry in &manifest {
        let name = entry["type"].as_str().unwrap();
        let dtype = GgmlType::from_id(entry["id"].as_u64().unwrap() as u32);
        assert_eq!(dtype.name(), name, "ggml name of type id {}", entry["id"]);
        let n = entry["n_elements"].as_u64().unwrap() as usize;
        let raw = std::fs::read(dir.path().join(format!("{name}.bin"))).unwrap();
        let want = read_f32(&dir.path().join(format!("{name}.f32")));
        assert_eq!(raw.len(), dtype.bytes_for(n).unwrap(), "{name}: byte count");
        assert_eq!(want.len(), n, "{name}: oracle element count");

        // Whole buffer (large enough to be split over threads).
        let mut got = vec![f32::NAN; n];
        dequantize(dtype, &raw, &mut got).unwrap();
        assert_bits_eq(name, &got, &want);

        // A few blocks on their own (single-threaded path).
        let (bs, ts) = (dtype.block_size().unwrap(), dtype.type_size().unwrap());
        let mut few = vec![f32::NAN; 3 * bs];
        dequantize(dtype, &raw[ts..4 * ts], &mut few).unwrap();
        assert_bits_eq(&format!("{name} blocks 1..4"), &few, &want[bs..4 * bs]);

        // A byte too few is an error, not a panic or a partial result.
        let err = dequantize(dtype, &raw[..raw.len() - 1], &mut got).unwrap_err();
        assert!(
            matches!(err, GgufError::LengthMismatch { .. }),
            "{name}: {err}"
        );
    }
}

#[test]
fn dequant_rejects_unsupported_types() {
    for t in [
        GgmlType::IQ2XXS,
        GgmlType::IQ4NL,
        GgmlType::Q8_1,
        GgmlType::I32,
        GgmlType::Other(1000),
    ] {
        let mut out = vec![0f32; 256];
        let err = dequantize(t, &[0u8; 1024], &mut out).unwrap_err();
        assert!(
            matches!(&err, GgufError::UnsupportedType { dtype } if *dtype == t.to_string()),
            "{t}: {err}"
        );
    }
}

// ---------------------------------------------------------------- real files

/// gguf-py's value type name for a [`GgufValue`].
fn py_type(v: &GgufValue) -> &'static str {
    match v {
        GgufValue::U8(_) => "UINT8",
        GgufValue::I8(_) => "INT8",
        GgufValue::U16(_) => "UINT16",
        GgufValue::I16(_) => "INT16",
        GgufValue::U32(_) => "UINT32",
        GgufValue::I32(_) => "INT32",
        GgufValue::U64(_) => "UINT64",
        GgufValue::I64(_) => "INT64",
        GgufValue::F32(_) => "FLOAT32",
        GgufValue::F64(_) => "FLOAT64",
        GgufValue::Bool(_) => "BOOL",
        GgufValue::String(_) => "STRING",
        GgufValue::Array(_) => "ARRAY",
    }
}

/// Whether a scalar matches its JSON form printed by gguf-py.
fn scalar_eq(v: &GgufValue, j: &Value) -> bool {
    match v {
        GgufValue::U8(x) => j.as_u64() == Some(u64::from(*x)),
        GgufValue::U16(x) => j.as_u64() == Some(u64::from(*x)),
        GgufValue::U32(x) => j.as_u64() == Some(u64::from(*x)),
        GgufValue::U64(x) => j.as_u64() == Some(*x),
        GgufValue::I8(x) => j.as_i64() == Some(i64::from(*x)),
        GgufValue::I16(x) => j.as_i64() == Some(i64::from(*x)),
        GgufValue::I32(x) => j.as_i64() == Some(i64::from(*x)),
        GgufValue::I64(x) => j.as_i64() == Some(*x),
        // JSON holds the f32 value printed as a double; rounding back to f32 is exact.
        GgufValue::F32(x) => j.as_f64().map(|f| (f as f32).to_bits()) == Some(x.to_bits()),
        GgufValue::F64(x) => j.as_f64().is_some_and(|f| (f - x).abs() <= 1e-15 * x.abs()),
        GgufValue::Bool(x) => j.as_bool() == Some(*x),
        GgufValue::String(s) => j.as_str() == Some(s.as_str()),
        GgufValue::Array(_) => false,
    }
}

/// Prints the metadata the way the report wants it: scalars in full (long
/// strings cut), arrays as element type and length.
fn print_metadata(f: &GgufFile) {
    eprintln!("== {} (GGUF v{})", f.path().display(), f.version());
    for (k, v) in f.metadata() {
        match v {
            GgufValue::Array(items) => eprintln!(
                "  {k}: array of {} {}",
                items.len(),
                items.first().map_or("?", GgufValue::type_name)
            ),
            GgufValue::String(s) if s.len() > 120 => {
                let head: String = s.chars().take(120).collect();
                eprintln!("  {k}: string of {} bytes: {head:?}...", s.len())
            }
            other => eprintln!("  {k}: {} {other}", other.type_name()),
        }
    }
    let mut types: Vec<(String, usize)> = Vec::new();
    for t in f.tensors() {
        match types.iter_mut().find(|(n, _)| *n == t.dtype.name()) {
            Some((_, c)) => *c += 1,
            None => types.push((t.dtype.name().to_string(), 1)),
        }
    }
    eprintln!("  tensors: {} {types:?}", f.tensors().len());
}

fn check_real_file(path: PathBuf) {
    assert!(
        path.exists(),
        "missing asset {} (run scripts/setup.sh)",
        path.display()
    );
    let f = GgufFile::open(&path).unwrap();
    print_metadata(&f);

    // Tensors to compare: the usual suspects, plus the first tensor of each
    // type not covered by them, so every type in the file gets checked.
    let mut picks: Vec<String> = [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.ffn_down.weight",
    ]
    .iter()
    .filter(|n| f.tensor_info(n).is_some())
    .map(|n| n.to_string())
    .collect();
    for t in f.tensors() {
        let covered = picks
            .iter()
            .any(|p| f.tensor_info(p).unwrap().dtype == t.dtype);
        if !covered {
            picks.push(t.name.clone());
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![path_str(&path), path_str(dir.path())];
    args.extend(picks.iter().map(String::as_str));
    let oracle: Value = serde_json::from_str(&run_oracle("gguf_inspect.py", &args)).unwrap();

    assert_eq!(u64::from(f.version()), oracle["version"].as_u64().unwrap());
    assert_eq!(f.alignment(), oracle["alignment"].as_u64().unwrap());
    assert_eq!(f.data_offset(), oracle["data_offset"].as_u64().unwrap());

    // Metadata: same keys, types and values (arrays element by element).
    let meta = oracle["metadata"].as_object().unwrap();
    assert_eq!(f.metadata().len(), meta.len(), "metadata key count");
    for (key, want) in meta {
        let v = f.get(key).unwrap_or_else(|| panic!("key {key} missing"));
        assert_eq!(py_type(v), want["type"].as_str().unwrap(), "type of {key}");
        match v {
            GgufValue::Array(items) => {
                let jitems = want["value"].as_array().unwrap();
                assert_eq!(items.len(), jitems.len(), "length of {key}");
                if let Some(first) = items.first() {
                    assert_eq!(Some(py_type(first)), want["elem_type"].as_str(), "{key}");
                }
                for (i, (item, j)) in items.iter().zip(jitems).enumerate() {
                    assert!(scalar_eq(item, j), "{key}[{i}]: {item} vs {j}");
                }
            }
            scalar => assert!(
                scalar_eq(scalar, &want["value"]),
                "{key}: {scalar} vs {}",
                want["value"]
            ),
        }
    }

    // Tensor table: same order, names, shapes, types, offsets and sizes.
    let jtensors = oracle["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), jtensors.len(), "tensor count");
    for (t, j) in f.tensors().iter().zip(jtensors) {
        assert_eq!(t.name, j["name"].as_str().unwrap());
        let shape: Vec<usize> = j["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "shape of {}", t.name);
        assert_eq!(t.dtype.name(), j["type"].as_str().unwrap(), "{}", t.name);
        assert_eq!(u64::from(t.dtype.id()), j["type_id"].as_u64().unwrap());
        assert_eq!(
            t.offset,
            j["offset"].as_u64().unwrap(),
            "offset of {}",
            t.name
        );
        let n_bytes = j["n_bytes"].as_u64().unwrap() as usize;
        assert_eq!(t.n_bytes(), Some(n_bytes), "{}", t.name);
        assert_eq!(f.tensor_bytes(&t.name).unwrap().len(), n_bytes);
        assert!(t.dtype.can_dequantize(), "{} has type {}", t.name, t.dtype);
    }

    // Dequantized values, bit for bit.
    for name in &picks {
        let t0 = std::time::Instant::now();
        let (shape, got) = f.tensor_f32(name).unwrap();
        let took = t0.elapsed();
        let info = f.tensor_info(name).unwrap();
        assert_eq!(shape, info.shape);
        let want = read_f32(&dir.path().join(format!("{name}.f32")));
        assert_bits_eq(&format!("{name} ({})", info.dtype), &got, &want);
        eprintln!(
            "  {name} ({}, {shape:?}): {} values identical; dequantized in {took:?}",
            info.dtype,
            got.len()
        );
    }
}

#[test]
fn real_smollm2_matches_gguf_py() {
    check_real_file(smollm2_gguf());
}

#[test]
fn real_gemma3_matches_gguf_py() {
    check_real_file(gemma3_gguf());
}

// ---------------------------------------------------------------- small files

/// Writes `small.gguf` and `iq.gguf` with GGUFWriter; returns the temp dir and
/// gguf-py's description of them.
fn small_files() -> (tempfile::TempDir, Value) {
    let dir = tempfile::tempdir().unwrap();
    let desc = run_oracle("gguf_write.py", &[path_str(dir.path())]);
    (dir, serde_json::from_str(&desc).unwrap())
}

fn tensor_range(desc: &Value, file: &str, tensor: &str) -> (usize, usize) {
    let t = &desc[file]["tensors"][tensor];
    (
        t["start"].as_u64().unwrap() as usize,
        t["end"].as_u64().unwrap() as usize,
    )
}

/// Writes `bytes` to `dir/name` and opens it.
fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> (PathBuf, Result<GgufFile, GgufError>) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let r = GgufFile::open(&p);
    (p, r)
}

#[test]
fn small_file_metadata_and_tensors() {
    let (dir, desc) = small_files();
    let path = dir.path().join("small.gguf");
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), path);
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(
        f.data_offset(),
        desc["small"]["data_offset"].as_u64().unwrap()
    );
    assert_eq!(f.metadata().len(), 10);

    assert_eq!(f.get_str("general.architecture").unwrap(), "test");
    assert_eq!(f.get("test.u32"), Some(&GgufValue::U32(7)));
    assert_eq!(f.get_u64("test.u32").unwrap(), 7);
    assert_eq!(f.get_i64("test.i8").unwrap(), -3);
    assert_eq!(f.get_f64("test.f32").unwrap(), 0.5);
    assert_eq!(f.get_f64("test.u32").unwrap(), 7.0);
    assert_eq!(f.get_u64("test.u64").unwrap(), 1 << 40);
    assert!(f.get_bool("test.bool").unwrap());
    assert_eq!(f.get_str("test.name").unwrap(), "h\u{e9}llo");
    let ints: Vec<i64> = f
        .get_array("test.ints")
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ints, [1, 2, 3]);
    let strs: Vec<&str> = f
        .get_array("test.strs")
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(strs, ["a", "bc"]);

    let file = path.display().to_string();
    let err = f.get_u64("test.missing").unwrap_err();
    assert!(matches!(err, GgufError::MissingKey { .. }), "{err}");
    assert_names(&err, &[&file, "test.missing"]);
    let err = f.get_str("test.u32").unwrap_err();
    assert!(matches!(err, GgufError::WrongType { .. }), "{err}");
    assert_names(&err, &[&file, "test.u32", "string"]);
    let err = f.get_u64("test.i8").unwrap_err();
    assert!(matches!(err, GgufError::WrongType { .. }), "{err}");
    assert_names(&err, &[&file, "test.i8"]);
    let err = f.get_array("test.name").unwrap_err();
    assert!(matches!(err, GgufError::WrongType { .. }), "{err}");

    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["t.f32", "t.q8_0", "t.f16"]);
    let expect = [
        ("t.f32", vec![3, 64], GgmlType::F32),
        ("t.q8_0", vec![2, 64], GgmlType::Q8_0),
        ("t.f16", vec![4, 32], GgmlType::F16),
    ];
    let raw = std::fs::read(&path).unwrap();
    for (name, shape, dtype) in expect {
        let info = f.tensor_info(name).unwrap();
        assert_eq!(info.shape, shape);
        assert_eq!(info.dtype, dtype);
        let (start, end) = tensor_range(&desc, "small", name);
        assert_eq!(f.tensor_bytes(name).unwrap(), &raw[start..end], "{name}");
        assert_eq!(info.offset, (start as u64) - f.data_offset());
        let (got_shape, got) = f.tensor_f32(name).unwrap();
        assert_eq!(got_shape, shape);
        let want: Vec<f32> = desc["small"]["tensors"][name]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_bits_eq(name, &got, &want);
    }

    let err = f.tensor_f32("t.nope").unwrap_err();
    assert!(matches!(err, GgufError::MissingTensor { .. }), "{err}");
    assert_names(&err, &[&file, "t.nope"]);
    let err = f.tensor_bytes("t.nope").unwrap_err();
    assert!(matches!(err, GgufError::MissingTensor { .. }), "{err}");
}

#[test]
fn version_2_is_read_like_version_3() {
    let (dir, _) = small_files();
    let mut bytes = std::fs::read(dir.path().join("small.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let (_, r) = open_bytes(dir.path(), "v2.gguf", &bytes);
    let v2 = r.unwrap();
    let v3 = GgufFile::open(dir.path().join("small.gguf")).unwrap();
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.metadata(), v3.metadata());
    assert_eq!(v2.tensors(), v3.tensors());
}

#[test]
fn bad_version_and_magic() {
    let (dir, _) = small_files();
    let good = std::fs::read(dir.path().join("small.gguf")).unwrap();

    for version in [0u32, 1, 4, 0x0300_0000] {
        let mut bytes = good.clone();
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let (p, r) = open_bytes(dir.path(), "version.gguf", &bytes);
        let err = r.unwrap_err();
        if version == 0x0300_0000 {
            // Version 3 written big-endian.
            assert!(matches!(err, GgufError::Malformed { .. }), "{err}");
            assert_names(&err, &[&p.display().to_string(), "big-endian"]);
        } else {
            assert!(
                matches!(err, GgufError::UnsupportedVersion { version: v, .. } if v == version),
                "{err}"
            );
            assert_names(&err, &[&p.display().to_string(), &version.to_string()]);
        }
    }

    let mut bytes = good.clone();
    bytes[3] = b'X';
    let (p, r) = open_bytes(dir.path(), "magic.gguf", &bytes);
    let err = r.unwrap_err();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    assert_names(&err, &[&p.display().to_string()]);

    let (p, r) = open_bytes(dir.path(), "text.gguf", b"just some text, no GGUF here");
    let err = r.unwrap_err();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    assert_names(&err, &[&p.display().to_string()]);

    let (p, r) = open_bytes(dir.path(), "empty.gguf", b"");
    let err = r.unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert_names(&err, &[&p.display().to_string()]);

    let missing = dir.path().join("does-not-exist.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }), "{err}");
    assert_names(&err, &[&missing.display().to_string()]);
}

#[test]
fn truncated_files_name_file_and_tensor() {
    let (dir, desc) = small_files();
    let good = std::fs::read(dir.path().join("small.gguf")).unwrap();
    let (f32_start, _) = tensor_range(&desc, "small", "t.f32");
    let (_, last_end) = tensor_range(&desc, "small", "t.f16");
    assert_eq!(last_end, good.len(), "t.f16 should end the file");

    // One byte short of the last tensor's data.
    let (p, r) = open_bytes(dir.path(), "cut-last.gguf", &good[..last_end - 1]);
    let err = r.unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert_names(&err, &[&p.display().to_string(), "t.f16"]);

    // Inside the first tensor's data: that tensor is named.
    let (p, r) = open_bytes(dir.path(), "cut-first.gguf", &good[..f32_start + 10]);
    let err = r.unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert_names(&err, &[&p.display().to_string(), "t.f32"]);

    // Inside a metadata value: the key is named.
    let key = b"test.name";
    let at = good.windows(key.len()).position(|w| w == key).unwrap();
    let (p, r) = open_bytes(dir.path(), "cut-kv.gguf", &good[..at + key.len() + 6]);
    let err = r.unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert_names(&err, &[&p.display().to_string(), "test.name"]);

    // Every shorter prefix is a Truncated error (and none panics).
    let p = dir.path().join("prefix.gguf");
    for len in 0..last_end {
        std::fs::write(&p, &good[..len]).unwrap();
        match GgufFile::open(&p) {
            Err(GgufError::Truncated { path, .. }) => assert_eq!(path, p),
            other => panic!("prefix of {len} bytes: {other:?}"),
        }
    }
}

#[test]
fn missing_trailing_padding_is_fine() {
    let (dir, desc) = small_files();
    let good = std::fs::read(dir.path().join("iq.gguf")).unwrap();
    let (_, end) = tensor_range(&desc, "iq", "t.iq2");
    assert!(end < good.len(), "iq.gguf should end with padding");
    let (_, r) = open_bytes(dir.path(), "nopad.gguf", &good[..end]);
    let f = r.unwrap();
    assert_eq!(f.tensor_bytes("t.iq2").unwrap(), &good[end - 132..end]);
}

#[test]
fn unsupported_tensor_type_names_tensor_and_type() {
    let (dir, desc) = small_files();
    let path = dir.path().join("iq.gguf");
    let f = GgufFile::open(&path).unwrap();
    let info = f.tensor_info("t.iq2").unwrap();
    assert_eq!(info.dtype, GgmlType::IQ2XXS);
    assert_eq!(info.shape, [2, 256]);
    let (start, end) = tensor_range(&desc, "iq", "t.iq2");
    assert_eq!(f.tensor_bytes("t.iq2").unwrap().len(), end - start);
    let err = f.tensor_f32("t.iq2").unwrap_err();
    assert!(
        matches!(&err, GgufError::UnsupportedTensorType { tensor, dtype, .. }
            if tensor == "t.iq2" && dtype == "IQ2_XXS"),
        "{err}"
    );
    assert_names(&err, &[&path.display().to_string(), "t.iq2", "IQ2_XXS"]);
    // The other tensor of the file is fine.
    let (_, ok) = f.tensor_f32("t.ok").unwrap();
    assert_eq!(ok, (0..64).map(|i| i as f32).collect::<Vec<_>>());

    // An unknown type id cannot even be laid out: open() fails naming the tensor.
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"t.ok";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    let type_at = at + name.len() + 4 + 2 * 8; // n_dims, ne[0], ne[1]
    assert_eq!(
        bytes[type_at..type_at + 4],
        0u32.to_le_bytes(),
        "F32 type id"
    );
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let (p, r) = open_bytes(dir.path(), "unknown-type.gguf", &bytes);
    let err = r.unwrap_err();
    assert!(
        matches!(&err, GgufError::UnsupportedTensorType { tensor, .. } if tensor == "t.ok"),
        "{err}"
    );
    assert_names(&err, &[&p.display().to_string(), "t.ok", "type#99"]);
}

// ---------------------------------------------------------------- hand-built headers

/// A minimal GGUF v3 writer for headers gguf-py would refuse to write.
#[derive(Default)]
struct Builder {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
}

impl Builder {
    fn string(buf: &mut Vec<u8>, s: &[u8]) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s);
    }

    /// Adds a key with a raw, already encoded value of type `vtype`.
    fn kv(mut self, key: &str, vtype: u32, value: &[u8]) -> Self {
        Self::string(&mut self.kv, key.as_bytes());
        self.kv.extend(vtype.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    fn tensor(mut self, name: &str, ne: &[u64], type_id: u32, offset: u64) -> Self {
        Self::string(&mut self.infos, name.as_bytes());
        self.infos.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(type_id.to_le_bytes());
        self.infos.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    /// Header, padded to 32 bytes, followed by `data`.
    fn build(&self, data: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        b.extend(&self.infos);
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend(data);
        b
    }
}

fn u32v(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

#[test]
fn hand_built_headers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // No tensors at all, and a plain Q4_0 tensor: both fine.
    let (_, r) = open_bytes(d, "empty-ok.gguf", &Builder::default().build(&[]));
    assert!(r.unwrap().tensors().is_empty());
    let mut q4 = vec![0x00, 0x3c]; // d = 1.0
    q4.extend([0x98u8; 16]); // low nibble 8 -> 0, high nibble 9 -> 1
    let b = Builder::default().tensor("q", &[32], 2, 0);
    let (_, r) = open_bytes(d, "q4.gguf", &b.build(&q4));
    let (shape, vals) = r.unwrap().tensor_f32("q").unwrap();
    assert_eq!(shape, [32]);
    assert_eq!(vals, [[0f32; 16], [1f32; 16]].concat());

    let malformed = |name: &str, bytes: Vec<u8>, parts: &[&str]| {
        let (p, r) = open_bytes(d, name, &bytes);
        let err = r.unwrap_err();
        assert!(matches!(err, GgufError::Malformed { .. }), "{name}: {err}");
        let file = p.display().to_string();
        let mut all = vec![file.as_str()];
        all.extend(parts);
        assert_names(&err, &all);
    };
    let truncated = |name: &str, bytes: Vec<u8>, parts: &[&str]| {
        let (p, r) = open_bytes(d, name, &bytes);
        let err = r.unwrap_err();
        assert!(matches!(err, GgufError::Truncated { .. }), "{name}: {err}");
        let file = p.display().to_string();
        let mut all = vec![file.as_str()];
        all.extend(parts);
        assert_names(&err, &all);
    };

    // Arrays nested 1000 deep: refused without recursing that deep.
    let mut nested = Vec::new();
    for _ in 0..1000 {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    nested.extend(0u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    malformed(
        "nested.gguf",
        Builder::default().kv("deep", 9, &nested).build(&[]),
        &["deep", "nested"],
    );
    // Unknown value type.
    malformed(
        "vtype.gguf",
        Builder::default().kv("odd", 42, &[0; 8]).build(&[]),
        &["odd", "42"],
    );
    // Duplicate key.
    malformed(
        "dup.gguf",
        Builder::default()
            .kv("k", 4, &u32v(1))
            .kv("k", 4, &u32v(2))
            .build(&[]),
        &["duplicate", "'k'"],
    );
    // Alignment that is not a power of two.
    malformed(
        "align.gguf",
        Builder::default()
            .kv("general.alignment", 4, &u32v(48))
            .build(&[]),
        &["general.alignment"],
    );
    // Five dimensions.
    malformed(
        "dims.gguf",
        Builder::default()
            .tensor("t5", &[1; 5], 0, 0)
            .build(&[0; 4]),
        &["t5", "dimensions"],
    );
    // Row length not a multiple of the block size.
    malformed(
        "row.gguf",
        Builder::default()
            .tensor("odd_row", &[30], 2, 0)
            .build(&[0; 32]),
        &["odd_row", "block size"],
    );
    // Misaligned tensor offset.
    malformed(
        "offset.gguf",
        Builder::default().tensor("mis", &[1], 0, 4).build(&[0; 64]),
        &["mis", "alignment"],
    );
    // Duplicate tensor names.
    malformed(
        "duptensor.gguf",
        Builder::default()
            .tensor("same", &[8], 0, 0)
            .tensor("same", &[8], 0, 32)
            .build(&[0; 64]),
        &["duplicate", "same"],
    );
    // Tensor names must be UTF-8.
    let mut b = Builder::default();
    Builder::string(&mut b.infos, b"bad\xff");
    b.infos.extend(1u32.to_le_bytes());
    b.infos.extend(1u64.to_le_bytes());
    b.infos.extend(0u32.to_le_bytes());
    b.infos.extend(0u64.to_le_bytes());
    b.n_tensors = 1;
    malformed("utf8.gguf", b.build(&[0; 4]), &["UTF-8"]);
    // Element count that overflows.
    malformed(
        "overflow.gguf",
        Builder::default()
            .tensor("huge", &[1 << 40, 1 << 40], 0, 0)
            .build(&[]),
        &["huge", "overflows"],
    );

    // Absurd counts and lengths: an error, without allocating them.
    let mut absurd = Builder::default().build(&[]);
    absurd[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // n_kv
    truncated("nkv.gguf", absurd, &["metadata entry count"]);
    let mut absurd = Builder::default().build(&[]);
    absurd[8..16].copy_from_slice(&(1u64 << 50).to_le_bytes()); // n_tensors
    truncated("ntensors.gguf", absurd, &["tensor count"]);
    let mut arr = u32v(0);
    arr.extend((1u64 << 62).to_le_bytes());
    truncated(
        "array.gguf",
        Builder::default().kv("big", 9, &arr).build(&[]),
        &["big", "array element count"],
    );
    let mut s = (u64::MAX - 3).to_le_bytes().to_vec();
    s.extend(b"abc");
    truncated(
        "string.gguf",
        Builder::default().kv("str", 8, &s).build(&[]),
        &["str", "string length"],
    );
    // Tensor data past the end of the file.
    truncated(
        "data.gguf",
        Builder::default()
            .tensor("big", &[1 << 20], 0, 0)
            .build(&[0; 64]),
        &["big", "extends past the end"],
    );
}

#[test]
fn corrupted_headers_never_panic() {
    let (dir, desc) = small_files();
    let good = std::fs::read(dir.path().join("small.gguf")).unwrap();
    let header_len = desc["small"]["data_offset"].as_u64().unwrap() as usize;
    let p = dir.path().join("fuzz.gguf");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut ok, mut errs) = (0, 0);
    for _ in 0..1500 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % header_len;
            bytes[at] = next() as u8;
        }
        std::fs::write(&p, &bytes).unwrap();
        // Reading everything must not panic either.
        match GgufFile::open(&p) {
            Ok(f) => {
                ok += 1;
                for t in f.tensors() {
                    let _ = f.tensor_f32(&t.name);
                }
            }
            Err(e) => {
                errs += 1;
                assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            }
        }
    }
    eprintln!("fuzz: {ok} opened, {errs} errors");
    assert!(errs > 0);
}
