"""Oracle: the tiny random Llama of tiny_models.py written as a GGUF file the
way llama.cpp's converter writes Llama checkpoints.

Usage: tiny_gguf.py TINY_DIR OUT_DIR
  TINY_DIR: output of tiny_models.py (reads TINY_DIR/llama).
Writes OUT_DIR/llama.gguf: F32 tensors under llama.cpp names, Q/K rows permuted
into llama.cpp's rotary layout, Llama 3 RoPE scaling as the `rope_freqs.weight`
factor tensor, and a minimal gpt2 tokenizer vocabulary; and OUT_DIR/f64.gguf,
the same with blk.1.ffn_up stored as F64 (a GGML type the Rust loader does not
take for weights and must refuse with an error naming the tensor). transformers' logits for the same ids are in
TINY_DIR/llama/oracle.safetensors.
"""

import json
import math
import os
import sys

import numpy as np
from gguf import GGUFWriter
from safetensors.numpy import load_file


def permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(cfg):
    rp = cfg["rope_parameters"]
    dim = cfg["head_dim"]
    base = rp["rope_theta"]
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write(path, cfg, tensors, odd_name=None):
    w = GGUFWriter(path, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    w.add_token_types([1] * cfg["vocab_size"])
    w.add_token_merges([])
    for name, arr in tensors.items():
        if name == odd_name:
            w.add_tensor(name, arr.astype(np.float64))  # GGML type F64
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(tiny_dir, out_dir):
    src = os.path.join(tiny_dir, "llama")
    cfg = json.load(open(os.path.join(src, "config.json")))
    idx = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    hf = {}
    for f in sorted(set(idx["weight_map"].values())):
        hf.update(load_file(os.path.join(src, f)))
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    out = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
        "rope_freqs.weight": llama3_factors(cfg),
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf_mod, gg in names.items():
            w = hf[f"model.layers.{i}.{hf_mod}.weight"]
            if gg == "attn_q":
                w = permute(w, cfg["num_attention_heads"])
            elif gg == "attn_k":
                w = permute(w, cfg["num_key_value_heads"])
            out[f"blk.{i}.{gg}.weight"] = np.ascontiguousarray(w.astype(np.float32))
    os.makedirs(out_dir, exist_ok=True)
    write(os.path.join(out_dir, "llama.gguf"), cfg, out)
    write(os.path.join(out_dir, "f64.gguf"), cfg, out, odd_name="blk.1.ffn_up.weight")
    print(json.dumps({"files": ["llama.gguf", "f64.gguf"]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
