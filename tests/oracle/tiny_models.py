"""Oracle: tiny random HF models and their transformers logits.

Usage: tiny_models.py OUT_DIR

For each family (llama with GQA and llama3 RoPE scaling, sharded; qwen2 with
qkv bias; mistral with a sliding window; gemma3 with QK-norm, sandwich norms,
GeGLU, local/global layers and soft-capping) writes OUT_DIR/<name>/ holding the
checkpoint as transformers saves it (config.json + safetensors) and
oracle.safetensors with `input_ids` [2, T] and transformers' float32 `logits`
[2, T, V] from the eager (reference) attention implementation.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    Gemma3TextConfig,
    Gemma3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SEQ = 24
VOCAB = 96

common = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    attn_implementation="eager",
)

FAMILIES = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            tie_word_embeddings=False,
        ),
        "20KB",  # sharded, with model.safetensors.index.json
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1e6, tie_word_embeddings=True), None),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=8, head_dim=16), None),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            head_dim=32,
            num_attention_heads=4,
            num_key_value_heads=1,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=1e4),
            },
            final_logit_softcapping=30.0,
            # transformers ignores this for Gemma 3 (kept to check we do the same)
            attn_logit_softcapping=50.0,
            hidden_activation="gelu_pytorch_tanh",
        ),
        None,
    ),
}


def main(out_dir):
    torch.manual_seed(0)
    for name, (cfg_cls, model_cls, extra, shard) in FAMILIES.items():
        cfg = cfg_cls(**{**common, **extra})
        model = model_cls(cfg).eval().float()
        with torch.no_grad():
            # Random init leaves norms at 1 (0 for Gemma): perturb every parameter
            # so that norms, biases and tied heads are really exercised.
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = os.path.join(out_dir, name)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(d, **kwargs)
        ids = torch.randint(0, VOCAB, (2, SEQ))
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, os.path.join(d, "oracle.safetensors"))
    print(json.dumps(sorted(FAMILIES)))


if __name__ == "__main__":
    main(sys.argv[1])
