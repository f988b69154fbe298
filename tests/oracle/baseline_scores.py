"""Oracle: training-free KV compression baseline scores from transformers.

Usage: baseline_scores.py INPUT.json

INPUT.json: {"model": checkpoint dir, "ids": [[int]] right-padded [batch, lc],
"len": [int], "spans": [[[start, n], ...], ...], "window": int, "kernel": int,
"expected_attention": optional [{"future", "sinks", "window", "covariance",
"vnorm"}]}.

Runs the HF model (eager attention, output_attentions=True, use_cache=True with
a plain DynamicCache so sliding-window layers keep every key) over the padded
batch with its attention mask and prints JSON {"h2o", "snapkv", "key_norm",
"expected_attention"}, each [batch, lc] (float64 sums of transformers' own
float32 attention probabilities and cached post-RoPE keys; expected_attention
is a list, one per parameter set of the input):

- h2o: attention mass each key receives from every real query, summed over
  heads and layers;
- snapkv: for each span, attention from the queries of its last min(window, n)
  positions, averaged over heads, summed over those queries, max-pooled over
  the span (kernel, same padding, not crossing the span), summed over layers;
  0 outside spans;
- key_norm: -(mean over layers and KV heads of the keys' L2 norms);
- expected_attention (kvpress's ExpectedAttentionPress, per span): in a span
  (s, n) of a context of length L, the first min(sinks, n) positions are
  sinks, the rest P are scored. Per layer and query head: mu, Sigma = mean and
  covariance (divided by the count) of the pre-RoPE queries at P (the last
  `window` of P when window > 0), where the queries are q_proj of the
  input-layernormed hidden state entering the layer, then q_norm where the
  layer has one (Gemma 3); R = kvpress's matrix cos*I + sin*P of the layer's
  rotary embedding averaged over positions L .. L+future-1; each key k at P
  (post-RoPE, from the DynamicCache) gets a = s (R mu).k + s^2/2 k^T (R Sigma
  R^T) k (second term only with covariance; s = the attention's `scaling`),
  softmax over P, mean over the query heads of each KV head, times the
  value's L2 norm (vnorm), mean over KV heads, summed over layers; sinks get
  M + 1, M the span's largest score at P (0 when P is empty); 0 outside spans.
"""

import inspect

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
            output_hidden_states=True,
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

    ea = [
        expected_attention(model, out.hidden_states, cache, inp["spans"], lens, lc, p).tolist()
        for p in inp.get("expected_attention", [])
    ]
    print(
        json.dumps(
            {
                "h2o": h2o.tolist(),
                "snapkv": snap.tolist(),
                "key_norm": key_norm.tolist(),
                "expected_attention": ea,
            }
        )
    )


def avg_rotation(model, layer, start, future, d):
    """kvpress's averaged RoPE matrix R = mean_t (cos_t I + sin_t P) over
    positions start .. start+future-1, from the model's own rotary embedding."""
    rotary = model.model.rotary_emb
    pos = torch.arange(start, start + future).unsqueeze(0)
    x = torch.zeros(1, dtype=torch.float32)
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        cos, sin = rotary(x, pos, model.config.layer_types[layer])
    else:
        cos, sin = rotary(x, pos)
    cos, sin = cos[0].double(), sin[0].double()  # [future, d]
    eye = torch.eye(d, dtype=torch.float64)
    p = torch.zeros(d, d, dtype=torch.float64)
    p[d // 2 :, : d // 2] = torch.eye(d // 2)
    p[: d // 2, d // 2 :] = -torch.eye(d // 2)
    r = cos.unsqueeze(1) * eye + sin.unsqueeze(1) * p  # [future, d, d]
    return r.mean(0)


def expected_attention(model, hidden, cache, spans, lens, lc, prm):
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    group = heads // kv_heads
    out = torch.zeros(len(lens), lc, dtype=torch.float64)
    with torch.no_grad():
        for l, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            d = attn.head_dim
            x = layer.input_layernorm(hidden[l])
            b = x.shape[0]
            q = attn.q_proj(x).view(b, lc, heads, d).transpose(1, 2)
            if getattr(attn, "q_norm", None) is not None:
                q = attn.q_norm(q)
            q = q.double()
            keys = cache.layers[l].keys.double()
            values = cache.layers[l].values.double()
            assert keys.shape[2] == lc
            scale = attn.scaling
            for i, row in enumerate(spans):
                r = avg_rotation(model, l, lens[i], prm["future"], d)
                for s, n in row:
                    sinks = min(prm["sinks"], n)
                    m = n - sinks
                    if m == 0:
                        continue
                    cnt = min(prm["window"], m) if prm["window"] > 0 else m
                    qs = q[i, :, s + n - cnt : s + n]  # [heads, cnt, d]
                    mu = qs.mean(1)
                    c = qs - mu.unsqueeze(1)
                    cov = torch.einsum("hsi,hsj->hij", c, c) / cnt
                    mu = mu @ r.T
                    cov = r @ cov @ r.T
                    k = keys[i, :, s + sinks : s + n].repeat_interleave(group, 0)  # [heads, m, d]
                    a = scale * torch.einsum("hd,hmd->hm", mu, k)
                    if prm["covariance"]:
                        a = a + scale**2 / 2 * torch.einsum("hmi,hij,hmj->hm", k, cov, k)
                    sc = torch.softmax(a, -1).view(kv_heads, group, m).mean(1)
                    if prm["vnorm"]:
                        sc = sc * values[i, :, s + sinks : s + n].norm(dim=-1)
                    out[i, s + sinks : s + n] += sc.mean(0)
    for i, row in enumerate(spans):
        for s, n in row:
            sinks = min(prm["sinks"], n)
            top = out[i, s + sinks : s + n].max().item() if n > sinks else 0.0
            out[i, s : s + sinks] = top + 1.0
    return out


if __name__ == "__main__":
    main(sys.argv[1])
