"""How far does transformers' own bf16 run drift from float32 on the same GGUF
model? Calibrates the bf16 tolerance of bench/gpu_foundation.sh.

Usage: hf_bf16_reference.py MODEL.gguf RESULTS_DIR
RESULTS_DIR holds gpu_foundation.sh's logits_{cpu_f32,cuda_bf16}.safetensors
(ids + our logits). Prints, for the same ids on CUDA: transformers f32 vs ours
(CPU f32), transformers bf16 vs transformers f32, ours bf16 vs transformers f32.
"""

import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def stats(name, x, ref):
    x, ref = x.double(), ref.double()
    rel = ((x - ref).norm() / ref.norm()).item()
    agree = (x.argmax(-1) == ref.argmax(-1)).double().mean().item()
    print(f"{name}: max_abs_diff={(x - ref).abs().max().item():.3e} rel_l2={rel:.3e} argmax_agreement={agree:.4f}")


def main(gguf, res):
    d, name = os.path.split(os.path.abspath(gguf))
    ours = load_file(os.path.join(res, "logits_cpu_f32.safetensors"))
    ours_bf16 = load_file(os.path.join(res, "logits_cuda_bf16.safetensors"))["logits"]
    ids = ours["ids"].cuda()
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dt).cuda().eval()
        with torch.no_grad():
            out[dt] = m(input_ids=ids).logits.float().cpu()
        del m
    stats("transformers_f32_cuda vs ours_f32_cpu", out[torch.float32], ours["logits"])
    stats("transformers_bf16 vs transformers_f32", out[torch.bfloat16], out[torch.float32])
    stats("ours_bf16 vs transformers_f32", ours_bf16, out[torch.float32])
    stats("ours_bf16 vs transformers_bf16", ours_bf16, out[torch.bfloat16])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
