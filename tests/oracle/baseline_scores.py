"""Oracle: training-free KV compression baseline scores from transformers.

Usage: baseline_scores.py INPUT.json

INPUT.json: {"model": checkpoint dir, "ids": [[int]] right-padded [batch, lc],
"len": [int], "spans": [[[start, n], ...], ...], "window": int, "kernel": int}.

Runs the HF model (eager attention, output_attentions=True, use_cache=True with
a plain DynamicCache so sliding-window layers keep every key) over the padded
batch with its attention mask and prints JSON {"h2o", "snapkv", "key_norm"},
each [batch, lc] (float64 sums of transformers' own float32 attention
probabilities and cached post-RoPE keys):

- h2o: attention mass each key receives from every real query, summed over
  heads and layers;
- snapkv: for each span, attention from the queries of its last min(window, n)
  positions, averaged over heads, summed over those queries, max-pooled over
  the span (kernel, same padding, not crossing the span), summed over layers;
  0 outside spans;
- key_norm: -(mean over layers and KV heads of the keys' L2 norms).
"""

import json
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache


def main(path):
    with open(path) as f:
        inp = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(
        inp["model"], attn_implementation="eager", dtype=torch.float32
    ).eval()
    ids = torch.tensor(inp["ids"], dtype=torch.long)
    b, lc = ids.shape
    lens = inp["len"]
    mask = torch.tensor([[1 if p < n else 0 for p in range(lc)] for n in lens], dtype=torch.long)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            output_attentions=True,
            use_cache=True,
            past_key_values=DynamicCache(),
        )
    attns = [a.double() for a in out.attentions]  # [b, h, q, k] per layer
    real_q = mask.double()

    h2o = torch.zeros(b, lc, dtype=torch.float64)
    for a in attns:
        h2o += torch.einsum("bhqk,bq->bk", a, real_q)

    window, kernel = inp["window"], inp["kernel"]
    snap = torch.zeros(b, lc, dtype=torch.float64)
    for a in attns:
        mean = a.mean(1)  # [b, q, k]
        for i, spans in enumerate(inp["spans"]):
            for s, n in spans:
                w = min(window, n)
                raw = mean[i, s + n - w : s + n, s : s + n].sum(0)
                pooled = F.max_pool1d(raw.view(1, 1, n), kernel, 1, kernel // 2).view(n)
                snap[i, s : s + n] += pooled

    cache = out.past_key_values
    norms = []
    for layer in cache.layers:
        k = layer.keys.double()  # [b, kv, lc, d]
        assert k.shape[2] == lc, f"cache layer holds {k.shape[2]} of {lc} keys"
        norms.append(k.norm(dim=-1).mean(1))
    key_norm = -torch.stack(norms).mean(0)

    print(json.dumps({"h2o": h2o.tolist(), "snapkv": snap.tolist(), "key_norm": key_norm.tolist()}))


if __name__ == "__main__":
    main(sys.argv[1])
