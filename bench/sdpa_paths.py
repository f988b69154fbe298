"""Which SDPA kernels libtorch picks for the attention calls of the step, and
their forward + backward time (GitHub issue 7's profile): causal self-attention
over T tokens with GQA (32 query / 8 KV heads, head dim 64, bf16) passed as
`enable_gqa=True` (what the Rust model does) or with the KV heads repeated
(what HF's sdpa path does when it cannot use enable_gqa).

Usage: sdpa_paths.py [T ...]   (CUDA; prints one JSON line per variant)
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def run(t, variant):
    torch.manual_seed(0)
    q = torch.randn(1, 32, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, 32, t, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        if variant == "enable_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(
                q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True
            )
        o.backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(10):
        step()
    ev[1].record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted({e.key for e in prof.key_averages() if e.device_type.name == "CUDA"})
    flops = 4 * t * t * 64 * 32 / 2 * 3.5  # causal fwd (2 matmuls) + bwd (2.5x)
    ms = ev[0].elapsed_time(ev[1]) / 10
    print(json.dumps({"t": t, "variant": variant, "fwd_bwd_ms": ms, "tflops": flops / ms / 1e9,
                      "kernels": [k[:80] for k in kernels]}))


for t in [int(x) for x in sys.argv[1:]] or [4097, 16385]:
    for variant in ["enable_gqa", "repeat_kv"]:
        run(t, variant)
