"""The PyTorch reference of one KV-Distill training step (GitHub issue 7).

Plain PyTorch on HF transformers' LlamaForCausalLM (attn_implementation="sdpa"),
the same step as the Rust `kv-distill bench-step` (trainer/src/distill/step.rs):
frozen teacher over context + suffix (no grad; its first `scorer_layer` layers
feed the scorer), scorer -> top-k selection per span (select.rs, ties to the
earlier position), encoder over the context with LoRA routed to the kept span
positions (adaptor.rs: forward hooks on the target projections adding
`scale * (x A^T) B^T * mask`, no adaptor on the last layer's non-K/V
projections), compressed cache (kept positions' K/V at every layer, original
positions), decoder over the suffix with the straight-through score feed added
to every layer's attention logits (explicit attention, as the Rust decoder),
chunked forward + reverse KL with its analytic gradient (loss.rs), backward,
global-norm clipping and AdamW with warmup + cosine (trainer.rs, adamw.rs).

Two implementations of that step (`--impl`):
- legacy (the default; the CPU parity test's, tests/tests/kvdistill_ref.rs):
  the step as first written: selection on the host, LoRA hooks, the
  per-variable AdamW; `--compile` compiles the LlamaModel body only.
- fast (GitHub issue 17): no host synchronisation in the step (selection on
  the device, losses and gradient norm kept on the device), LoRA module
  wrappers, fused AdamW, and `--compile MODE` compiles the whole step. See
  the comment above `Route` for what changed and why.

Inputs come from `kv-distill bench-step --model DIR --dump DUMP`: DUMP/adaptor.safetensors
(the adaptor's initial tensors), DUMP/batch.json (batch, method and optimizer
settings). Both sides load the same HF checkpoint DIR.

Usage:
  kvdistill_ref.py --model DIR --dump DUMP [--steps N] [--impl legacy|fast]
                   [--compile [default|reduce-overhead|max-autotune]] [--no-fused]
                   [--device cpu|cuda] [--dtype f32|bf16]
  kvdistill_ref.py --model DIR --dump DUMP --parity [VARIANTS]  # fast vs legacy losses
  kvdistill_ref.py --make-tiny DIR   # writes a tiny random Llama checkpoint

Prints one JSON line: median_s, tokens_per_s, step_s (every step's time),
losses (one per step, before its update, as bench-step's), peak_memory_gib
(CUDA).
"""

import argparse
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

PROJ_MODULE = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}

# The decoder's per-key attention bias [batch, keys] (float32) while it runs.
_DECODER_BIAS = {"bias": None}


def capture_features(owner, model, layer):
    """Stores the hidden states after `layer` layers in `owner.features` at
    every forward (the scorer's input)."""
    assert 1 <= layer <= model.config.num_hidden_layers

    def capture(module, inputs, out):
        owner.features = out[0] if isinstance(out, tuple) else out

    model.model.layers[layer - 1].register_forward_hook(capture)


def cache_keyword(model):
    """The cache argument of the model body's forward: `cache` in recent
    transformers 5.x, `past_key_values` before (an unknown keyword would be
    silently ignored)."""
    import inspect

    params = inspect.signature(type(model.model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def gather_kept(enc, idx, comp):
    """Appends the kept positions `idx` [batch, slots] of every layer of the
    encoder output's cache to `comp` (a DynamicCache). The output's cache is
    `past_key_values` in most transformers versions, `cache` in some 5.x ones;
    its layers are `.layers` from 4.56 on, key/value lists before."""
    full = getattr(enc, "past_key_values", None)
    if full is None:
        full = enc.cache
    if hasattr(full, "layers"):
        kvs = [(lay.keys, lay.values) for lay in full.layers]
    else:
        kvs = list(zip(full.key_cache, full.value_cache))
    gi = idx[:, None, :, None]
    for layer, (k, v) in enumerate(kvs):
        g = gi.expand(-1, k.shape[1], -1, k.shape[3])
        comp.update(k.gather(2, g), v.gather(2, g), layer)


def fed_bias(cfg, scores, idx, span_slot, zeros_suffix):
    """The decoder's per-key bias: the kept slots' fed scores on the span
    slots, then zeros for the suffix's own keys."""
    slot_scores = scores.gather(1, idx)
    if cfg["score_feed"] == "straight_through":
        fed = slot_scores - slot_scores.detach()
    else:
        fed = slot_scores
    return torch.cat([fed * span_slot, zeros_suffix], 1)


def explicit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The Rust `attend_explicit`: q k^T * scale (float32) + bias, causal mask
    aligned to the end of the keys, float32 softmax, @ v. Batches here have no
    padding (bench-step), so the causal mask is all the masking there is."""
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    logits = (query @ key.transpose(2, 3)).float() * scaling
    bias = _DECODER_BIAS["bias"]
    if bias is not None:
        logits = logits + bias.float()[:, None, None, :]
    tq, tk = query.shape[2], key.shape[2]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), None


def kept_count(n, r):
    if n == 0:
        return 0
    return min(max(math.ceil(r * n), 1), n)


def f32_total_key(x):
    """A sort key with the order of Rust's f32::total_cmp."""
    (bits,) = struct.unpack("<i", struct.pack("<f", x))
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def select(scores, ctx_len, spans, ratio):
    """select.rs: top-k of each span by score (ties: earlier position) plus every
    position outside the spans; returns (kept, from_span), kept ascending."""
    keep = [True] * ctx_len
    span_pos = [False] * ctx_len
    for s, n in spans:
        k = kept_count(n, ratio)
        order = sorted(range(s, s + n), key=lambda p: (-f32_total_key(scores[p]), p))
        for p in order[k:]:
            keep[p] = False
        for p in range(s, s + n):
            span_pos[p] = True
    kept = [p for p in range(ctx_len) if keep[p]]
    return kept, [span_pos[p] for p in kept]


class Adaptor:
    """Scorer + LoRA pairs (float32 master weights), named as the Rust VarStore."""

    def __init__(self, tensors, distill, num_layers, device):
        self.p = {k: v.to(device=device, dtype=torch.float32).requires_grad_(True) for k, v in tensors.items()}
        self.names = sorted(self.p)
        lora = distill["lora"]
        self.scale = lora["alpha"] / lora["rank"]
        self.targets = []
        for layer in range(num_layers):
            for proj in lora["targets"]:
                # adaptor.rs: only K/V of the last layer reach the cache.
                if layer + 1 == num_layers and proj not in ("k", "v"):
                    continue
                self.targets.append((layer, proj))
        for layer, proj in self.targets:
            name = f"lora.{layer}.{PROJ_MODULE[proj][1]}"
            assert f"{name}.a" in self.p, f"missing {name}"
        self.mask = None  # [batch, seq, 1] while the encoder runs

    def score(self, hidden):
        h = hidden.float()
        z = F.linear(h, self.p["scorer.w1"], self.p["scorer.b1"]).relu()
        return F.linear(z, self.p["scorer.w2"], self.p["scorer.b2"]).squeeze(-1)

    def install(self, model):
        for layer, proj in self.targets:
            sub, name = PROJ_MODULE[proj]
            mod = getattr(getattr(model.model.layers[layer], sub), name)
            a, b = self.p[f"lora.{layer}.{name}.a"], self.p[f"lora.{layer}.{name}.b"]

            def hook(module, inputs, out, a=a, b=b):
                if self.mask is None:
                    return out
                x = inputs[0]
                kind = x.dtype
                delta = (x @ a.to(kind).t()) @ b.to(kind).t()
                return out + delta * self.mask.to(kind) * self.scale

            mod.register_forward_hook(hook)


def kl_mix(teacher, student, a, tau, chunk, on_device=False):
    """loss.rs: value and analytic gradient of a*KL(p_T||p_S) + (1-a)*KL(p_S||p_T).
    With `on_device`, no `.item()`: loss, fkl and rkl are 0-dim float64 tensors
    (the same float64 sums, chunk by chunk, in the same order)."""
    with torch.no_grad():
        rows = student.shape[0]
        grad = torch.empty_like(student)
        fsum = rsum = 0.0
        # config.rs: 0 is as many rows as fit 2^24 elements (at least 64).
        chunk = chunk if chunk > 0 else max(64, (1 << 24) // student.shape[1])
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            t = teacher[start:end].float() / tau
            s = student[start:end].float() / tau
            logp = t.log_softmax(-1)
            logq = s.log_softmax(-1)
            p, q = logp.exp(), logq.exp()
            diff = logq - logp
            fkl = (p * -diff).sum(-1, keepdim=True)
            rkl = (q * diff).sum(-1, keepdim=True)
            fs, rs = fkl.double().sum(), rkl.double().sum()
            fsum = fsum + (fs if on_device else fs.item())
            rsum = rsum + (rs if on_device else rs.item())
            g = (q - p) * a + q * (diff - rkl) * (1.0 - a)
            grad[start:end] = (g / (tau * rows)).to(grad.dtype)
        n = max(rows, 1)
        fkl, rkl = fsum / n, rsum / n
        return a * fkl + (1 - a) * rkl, fkl, rkl, grad

def lr_at(train, step):
    if step < train["warmup_steps"]:
        return train["lr"] * (step + 1) / train["warmup_steps"]
    span = max(train["total_steps"] - train["warmup_steps"], 1)
    t = min((step - train["warmup_steps"]) / span, 1.0)
    cos = 0.5 * (1.0 + math.cos(math.pi * t))
    return train["lr"] * (train["min_lr_ratio"] + (1.0 - train["min_lr_ratio"]) * cos)


class AdamW:
    """adamw.rs (= torch.optim.AdamW's update), moments per variable."""

    def __init__(self, params, weight_decay, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params = params
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.b1, self.b2, self.eps, self.wd = beta1, beta2, eps, weight_decay
        self.steps = 0

    @torch.no_grad()
    def step(self, lr):
        self.steps += 1
        bc1 = 1.0 - self.b1**self.steps
        bc2 = 1.0 - self.b2**self.steps
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if g is None:
                g = torch.zeros_like(p)
            if self.wd != 0.0:
                p.mul_(1.0 - lr * self.wd)
            m.mul_(self.b1).add_(g * (1.0 - self.b1))
            v.mul_(self.b2).addcmul_(g, g * (1.0 - self.b2))
            denom = v.sqrt() / math.sqrt(bc2) + self.eps
            p.addcdiv_(m * (-lr / bc1), denom)


class Step:
    def __init__(self, model, adaptor, distill, compile_mode=None):
        self.model = model
        self.adaptor = adaptor
        self.cfg = distill
        self.body = torch.compile(model.model, mode=compile_mode) if compile_mode else model.model
        self.features = None
        capture_features(self, model, distill["scorer_layer"])
        self.cache_kw = cache_keyword(model)

    def set_attention(self, name):
        self.model.config._attn_implementation = name

    def __call__(self, batch):
        """distill_step on one batch (equal lengths: no padding); returns (loss, fkl, rkl, tokens)."""
        model, ad, cfg = self.model, self.adaptor, self.cfg
        dev = model.device
        ctx = torch.tensor([e["context"] for e in batch], device=dev)
        suf = torch.tensor([e["suffix"] for e in batch], device=dev)
        b, lc = ctx.shape
        lx = suf.shape[1]
        full = torch.cat([ctx, suf], 1)
        # Supervised rows: suffix position j predicts suffix token j + 1.
        t_idx = torch.arange(lc, lc + lx - 1, device=dev)
        s_idx = torch.arange(0, lx - 1, device=dev)

        # Teacher (and the scorer's features).
        self.set_attention("sdpa")
        with torch.no_grad():
            h = self.body(input_ids=full, use_cache=False).last_hidden_state
            teacher_logits = model.lm_head(h[:, t_idx].flatten(0, 1))
            features = self.features[:, :lc]
        self.features = None

        # Scorer and selection.
        scores = ad.score(features)  # [b, lc] float32
        host = scores.detach().cpu().tolist()
        sels = [select(host[i], lc, [tuple(s) for s in batch[i]["spans"]], batch[i]["ratio"]) for i in range(b)]
        slots = max(max(len(k) for k, _ in sels), 1)
        mask = torch.zeros(b, lc)
        idx = torch.zeros(b, slots, dtype=torch.long)
        span_slot = torch.zeros(b, slots)
        for i, (kept, fs) in enumerate(sels):
            assert len(kept) == slots, "bench batches have equal lengths"
            for j, (p, f) in enumerate(zip(kept, fs)):
                idx[i, j] = p
                span_slot[i, j] = 1.0 if f else 0.0
                if f:
                    mask[i, p] = 1.0
        mask, idx, span_slot = mask.to(dev), idx.to(dev), span_slot.to(dev)

        # Encoder with LoRA routed to the kept span positions.
        ad.mask = mask.unsqueeze(-1)
        try:
            enc = self.body(input_ids=ctx, use_cache=True)
        finally:
            ad.mask = None
        from transformers import DynamicCache

        try:
            comp = DynamicCache(config=model.config)
        except TypeError:  # transformers < 4.56
            comp = DynamicCache()
        gather_kept(enc, idx, comp)
        # Decoder over the suffix at the original positions, with the score feed.
        bias = fed_bias(cfg, scores, idx, span_slot, torch.zeros(b, lx, device=dev))
        pos = (torch.arange(lx, device=dev) + lc).unsqueeze(0).expand(b, -1)
        assert comp.get_seq_length() == slots, "the compressed cache must hold the kept slots"
        _DECODER_BIAS["bias"] = bias
        self.set_attention("kvd_explicit")
        try:
            kw = {self.cache_kw: comp}
            hid = self.body(input_ids=suf, position_ids=pos, use_cache=True, **kw).last_hidden_state
        finally:
            _DECODER_BIAS["bias"] = None
            self.set_attention("sdpa")
        student_logits = model.lm_head(hid[:, s_idx].flatten(0, 1))
        loss, fkl, rkl, grad = kl_mix(
            teacher_logits, student_logits, cfg["kl_forward_weight"], cfg["temperature"], cfg["kl_chunk_rows"]
        )
        (student_logits * grad.detach()).sum(dtype=torch.float32).backward()
        return loss, fkl, rkl, grad.shape[0]


# ---------------------------------------------------------------------------
# The fast path (`--impl fast`, GitHub issue 17): the same step with no host
# synchronisation, so that `torch.compile` can take the whole step.
#
# Where the legacy path above synchronises or breaks graphs, and what the fast
# path does instead:
# - the batch becomes tensors (`torch.tensor(list)`, a host-to-device copy)
#   at every step: once, before the first step (`FastStep.__init__`);
# - `scores.cpu().tolist()` + `select()` in Python (a device-to-host read
#   that stalls the queue, per-position Python loops, then three more
#   host-to-device copies): `select_device`, two stable sorts on the device
#   with the same result (`check_select`);
# - forward hooks reading `Adaptor.mask` and multiplying the [b, lc, d_out]
#   LoRA output by it: module wrappers (`LoRALinear`) masking the [b, lc, r]
#   intermediate;
# - `config._attn_implementation` switched between passes: one registered
#   attention (`fast_attention`) that takes SDPA when no decoder bias is set;
# - `kl_mix`'s `.item()` per chunk (two reads a chunk): the sums stay 0-dim
#   float64 tensors;
# - the gradient norm read on the host (`float(sq)`) to decide clipping and
#   check finiteness: `torch.where` on the device; finiteness is checked after
#   the timed steps;
# - the Python float learning rate (a new constant, so a recompile, at every
#   compiled step): a 0-dim device tensor, filled before each step;
# - the per-variable AdamW (about 10 kernels per variable): `torch.optim.AdamW`
#   with `fused=True` (one kernel launch per device and dtype) where the
#   device has it, else `DeviceAdamW` (the legacy update, compile-friendly).
# Under `torch.compile` (TORCH_LOGS=graph_breaks,recompiles, CPU) the step
# is one graph up to `.backward()` (Dynamo does not trace it; AOTAutograd's
# compiled backward runs there), then one graph for the clipping; the fused
# AdamW is `torch.compiler.disable`d inside torch and runs as its one eager
# kernel (with --no-fused the update is compiled into the clipping graph).
# No recompiles after the first step.
# ---------------------------------------------------------------------------


class Route:
    """What the wrappers read during a pass: the encoder's LoRA routing mask
    ([b, lc, 1] float32, kept span positions 1) or None. An instance
    attribute from the start: a class attribute shadowed after the first step
    would fail a Dynamo guard and recompile the step once."""

    def __init__(self):
        self.mask = None


class LoRALinear(torch.nn.Module):
    """A frozen projection plus routed LoRA: `base(x) + ((x A^T) * mask) B^T *
    scale` while a mask is set, `base(x)` otherwise. Masking the rank-r
    intermediate instead of the output gives the same values as the hook
    (rows of mask 1 are untouched, rows of mask 0 add exact zeros) at a
    r/d_out of the elementwise cost."""

    def __init__(self, base, a, b, scale, route):
        super().__init__()
        self.base = base
        self.lora_a = a
        self.lora_b = b
        self.scale = scale
        self.route = route

    def forward(self, x):
        out = self.base(x)
        mask = self.route.mask
        if mask is None:
            return out
        kind = x.dtype
        h = (x @ self.lora_a.to(kind).t()) * mask.to(kind)
        return out + (h @ self.lora_b.to(kind).t()) * self.scale


def fast_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One attention for every pass: SDPA (causal, GQA in the kernel) for the
    teacher and the encoder (no padding, no cache offset: `is_causal` is exact),
    the explicit attention with the score feed for the decoder."""
    if _DECODER_BIAS["bias"] is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    return explicit_attention(module, query, key, value, None, scaling=scaling, **kwargs)


def f32_total_key_tensor(x):
    """`f32_total_key` elementwise on a float32 tensor (int32, same order)."""
    bits = x.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


class SelectPlan:
    """The batch's spans as tensors, for `select_device` (built once)."""

    def __init__(self, batch, ctx_len, dev):
        b = len(batch)
        spans = [[tuple(s) for s in e["spans"]] for e in batch]
        nspans = max((len(s) for s in spans), default=0)
        outside = nspans  # the sentinel span id: positions outside every span
        sid = torch.full((b, ctx_len), outside, dtype=torch.long)
        offset = torch.zeros(b, nspans + 1, dtype=torch.long)
        k_of = torch.full((b, nspans + 1), ctx_len + 1, dtype=torch.long)  # the sentinel keeps all
        slots = set()
        for i, (ss, e) in enumerate(zip(spans, batch)):
            off, dropped = 0, 0
            for j, (s, n) in enumerate(ss):
                sid[i, s : s + n] = j
                offset[i, j] = off
                k_of[i, j] = kept_count(n, e["ratio"])
                off += n
                dropped += n - kept_count(n, e["ratio"])
            # Spans sort by id, so the sentinel's positions start at `off`.
            offset[i, outside] = off
            slots.add(ctx_len - dropped)
        assert len(slots) == 1, "bench batches have equal lengths"
        self.slots = max(slots.pop(), 1)
        self.sid, self.offset, self.k_of = sid.to(dev), offset.to(dev), k_of.to(dev)
        self.span_pos = (sid < outside).to(dev)
        self.rank = torch.arange(ctx_len, device=dev).expand(b, -1)


def select_device(scores, plan):
    """`select()` on the device, without reading the scores on the host: one
    stable ascending sort by (span id, score descending in f32::total_cmp
    order) puts each span's positions in top-k order with ties to the earlier
    position (stability), the rank inside the span decides, and a second
    stable sort lists the kept positions ascending. Returns (idx [b, slots]
    long, from_span [b, slots] bool, mask [b, lc] float32 of kept span
    positions)."""
    key = f32_total_key_tensor(scores.detach().float()).long()
    composite = (plan.sid << 32) | ((2**31 - 1) - key)  # (2^31-1) - key is in [0, 2^32)
    _, order = torch.sort(composite, dim=1, stable=True)
    sid_sorted = plan.sid.gather(1, order)
    rank = plan.rank - plan.offset.gather(1, sid_sorted)
    keep_sorted = rank < plan.k_of.gather(1, sid_sorted)
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    _, idx = torch.sort((~keep).to(torch.uint8), dim=1, stable=True)
    idx = idx[:, : plan.slots]
    mask = (keep & plan.span_pos).float()
    return idx, plan.span_pos.gather(1, idx), mask


def check_select(trials=300, seed=0):
    """`select_device` against `select` (the legacy host selection, select.rs's
    order) on random contexts: several spans, random ratios, scores drawn
    from a few values (ties) including -0.0, +0.0 and the infinities, three
    examples a batch. Returns the number of batches compared; raises on the
    first difference."""
    import random

    rng = random.Random(seed)
    values = [-math.inf, -1.5, -0.0, 0.0, 0.25, 0.25 + 2**-20, 3.0, math.inf]
    for t in range(trials):
        lc = rng.randint(1, 80)
        spans, p = [], 0
        while p < lc and rng.random() < 0.7:
            s = rng.randint(p, lc - 1)
            n = rng.randint(1, lc - s)
            spans.append((s, n))
            p = s + n
        ratio = rng.choice([0.01, 0.1, 0.25, 0.5, 0.999, 1.0, rng.random() or 1.0])
        batch = [{"spans": spans, "ratio": ratio} for _ in range(3)]
        if t % 2:
            scores = torch.tensor([[rng.choice(values) for _ in range(lc)] for _ in batch], dtype=torch.float32)
        else:
            scores = torch.randn(len(batch), lc)
        idx, from_span, mask = select_device(scores, SelectPlan(batch, lc, torch.device("cpu")))
        for i in range(len(batch)):
            kept, fs = select(scores[i].tolist(), lc, spans, ratio)
            want_mask = torch.zeros(lc)
            for q, f in zip(kept, fs):
                want_mask[q] = float(f)
            if idx[i].tolist() != kept or from_span[i].tolist() != fs or not torch.equal(mask[i], want_mask):
                raise SystemExit(f"select_device differs from select: lc {lc} spans {spans} ratio {ratio} "
                                 f"scores {scores[i].tolist()}: {idx[i].tolist()} against {kept}")
    return trials


def kl_mix_device(teacher, student, a, tau, chunk):
    """`kl_mix` without `.item()` (its `on_device` form)."""
    return kl_mix(teacher, student, a, tau, chunk, on_device=True)

class FusedAdamW:
    """`torch.optim.AdamW(fused=True)` with a tensor learning rate, filled
    before each step (`prepare`), so a compiled or captured step reads it
    instead of baking in a constant. Its update is adamw.rs's (the fused
    kernel, aten/src/ATen/native/cuda/fused_adam_utils.cuh and
    cpu/FusedAdamKernel.cpp): decoupled decay `p -= lr wd p`, `m = b1 m +
    (1-b1) g`, `v = b2 v + (1-b2) g^2`, `p -= lr/(1-b1^t) m / (sqrt(v) /
    sqrt(1-b2^t) + eps)`, epsilon after the bias correction, moments of step
    t bias-corrected with t counted from 1. Rounding differs: the kernel forms
    the bias corrections and `lr/(1-b1^t)` in float32, and `p - lr wd p` rather
    than `p (1 - lr wd)`."""

    fused = True

    def __init__(self, params, weight_decay, dev):
        self.lr = torch.tensor(0.0, dtype=torch.float32, device=dev)
        self.opt = torch.optim.AdamW(
            params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, fused=True
        )

    def prepare(self, lr):
        self.lr.fill_(lr)

    def step(self):
        self.opt.step()


class DeviceAdamW:
    """The legacy `AdamW` (adamw.rs) op for op, with its step-dependent
    scalars (`1 - lr wd`, `-lr/bc1`, `sqrt(bc2)`, formed in float64 on the
    host as before) in float32 device tensors filled before each step
    (`prepare`, a kernel launch each, no copy from the host): the same
    rounding as the legacy update, and nothing for a compiled step to
    recompile for. Used where there is no fused kernel, or with --no-fused."""

    fused = False

    def __init__(self, params, weight_decay, dev, beta1=0.9, beta2=0.999, eps=1e-8):
        self.params = params
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.b1, self.b2, self.eps, self.wd = beta1, beta2, eps, weight_decay
        self.steps = 0
        self.decay, self.step_size, self.bc2_sqrt = (torch.zeros((), device=dev) for _ in range(3))
        # CUDA graphs (reduce-overhead) read and update these in place rather
        # than copying them in and out at every replay.
        for t in self.m + self.v + [self.decay, self.step_size, self.bc2_sqrt]:
            torch._dynamo.mark_static_address(t)

    def prepare(self, lr):
        self.steps += 1
        bc1 = 1.0 - self.b1**self.steps
        bc2 = 1.0 - self.b2**self.steps
        self.decay.fill_(1.0 - lr * self.wd)
        self.step_size.fill_(-lr / bc1)
        self.bc2_sqrt.fill_(math.sqrt(bc2))

    @torch.no_grad()
    def step(self):
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if self.wd != 0.0:
                p.mul_(self.decay)
            m.mul_(self.b1).add_(g * (1.0 - self.b1))
            v.mul_(self.b2).addcmul_(g, g * (1.0 - self.b2))
            denom = v.sqrt() / self.bc2_sqrt + self.eps
            p.addcdiv_(m * self.step_size, denom)


def make_optimizer(params, weight_decay, dev, fused):
    """FusedAdamW where the device has the kernel (CUDA, CPU in torch >= 2.4)
    and `fused`, else DeviceAdamW."""
    if fused:
        try:
            return FusedAdamW(params, weight_decay, dev)
        except (RuntimeError, ValueError):
            pass
    return DeviceAdamW(params, weight_decay, dev)


class FastAdaptor(Adaptor):
    """The adaptor with `torch.nn.Parameter`s (static inputs for CUDA graphs)
    installed as module wrappers instead of hooks."""

    def __init__(self, tensors, distill, num_layers, device):
        super().__init__(tensors, distill, num_layers, device)
        self.p = {k: torch.nn.Parameter(v.detach()) for k, v in self.p.items()}
        self.route = Route()

    def install(self, model):
        for layer, proj in self.targets:
            sub, name = PROJ_MODULE[proj]
            parent = getattr(model.model.layers[layer], sub)
            a, b = self.p[f"lora.{layer}.{name}.a"], self.p[f"lora.{layer}.{name}.b"]
            setattr(parent, name, LoRALinear(getattr(parent, name), a, b, self.scale, self.route))


class FastStep:
    """The whole training step (forward, backward, clipping, AdamW) on one
    batch prepared once; `run()` returns (loss, gradient norm) as 0-dim
    device tensors and never reads the device."""

    def __init__(self, model, adaptor, distill, train, batch, opt, params):
        self.model, self.ad, self.cfg, self.train = model, adaptor, distill, train
        self.opt, self.params = opt, params
        dev = model.device
        self.ctx = torch.tensor([e["context"] for e in batch], device=dev)
        self.suf = torch.tensor([e["suffix"] for e in batch], device=dev)
        b, lc = self.ctx.shape
        lx = self.suf.shape[1]
        self.full = torch.cat([self.ctx, self.suf], 1)
        self.pos = (torch.arange(lx, device=dev) + lc).unsqueeze(0).expand(b, -1)
        self.plan = SelectPlan(batch, lc, dev)
        self.zeros_suffix = torch.zeros(b, lx, device=dev)
        self.features = None
        capture_features(self, model, distill["scorer_layer"])
        self.cache_kw = cache_keyword(model)
        from transformers import DynamicCache  # here: an import inside the compiled step breaks its graph

        try:
            DynamicCache(config=model.config)
            self.new_cache = lambda: DynamicCache(config=model.config)
        except TypeError:  # transformers < 4.56
            self.new_cache = DynamicCache

    def forward(self):
        """The forward and the loss; returns (loss, student logits, their gradient)."""
        model, ad, cfg = self.model, self.ad, self.cfg
        body = model.model
        ctx, suf = self.ctx, self.suf
        b, lc = ctx.shape
        lx = suf.shape[1]

        with torch.no_grad():
            h = body(input_ids=self.full, use_cache=False).last_hidden_state
            teacher_logits = model.lm_head(h[:, lc : lc + lx - 1].flatten(0, 1))
            features = self.features[:, :lc]
        self.features = None

        scores = ad.score(features)
        idx, from_span, mask = select_device(scores, self.plan)
        span_slot = from_span.float()

        ad.route.mask = mask.unsqueeze(-1)
        try:
            enc = body(input_ids=ctx, use_cache=True)
        finally:
            ad.route.mask = None
        comp = self.new_cache()
        gather_kept(enc, idx, comp)
        bias = fed_bias(cfg, scores, idx, span_slot, self.zeros_suffix)
        _DECODER_BIAS["bias"] = bias
        try:
            kw = {self.cache_kw: comp}
            hid = body(input_ids=suf, position_ids=self.pos, use_cache=True, **kw).last_hidden_state
        finally:
            _DECODER_BIAS["bias"] = None
        student_logits = model.lm_head(hid[:, : lx - 1].flatten(0, 1))
        loss, _, _, grad = kl_mix_device(
            teacher_logits, student_logits, cfg["kl_forward_weight"], cfg["temperature"], cfg["kl_chunk_rows"]
        )
        return loss, student_logits, grad

    def run(self):
        loss, student_logits, grad = self.forward()
        # d/dlogits of (logits * grad).sum() is grad: the legacy surrogate's backward.
        student_logits.backward(grad)
        return loss, self.clip_and_update()

    def clip_and_update(self):
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:  # the legacy AdamW steps these with a zero gradient
                    p.grad = torch.zeros_like(p)
            sq = sum(p.grad.double().pow(2).sum() for p in self.params)
            norm = sq.sqrt()
            mx = self.train["max_grad_norm"]
            if mx > 0:
                # The legacy `if norm > mx: grad *= mx / (norm + 1e-6)`; x * 1.0 is exact.
                coef = torch.where(norm > mx, mx / (norm + 1e-6), torch.ones_like(norm)).float()
                # Out of place: a graph that mutates its inputs (the backward
                # graph's outputs) would not be captured as a CUDA graph.
                for p, g in zip(self.params, torch._foreach_mul([p.grad for p in self.params], coef)):
                    p.grad = g
        self.opt.step()
        return norm


def make_tiny(out, layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        # Larger than Llama's 0.02, so that the random model's attention and
        # next-token distributions are far from uniform and the KL is not tiny.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode_for(mode, dev):
    """The torch.compile mode to use on `dev`: CUDA graphs (reduce-overhead,
    max-autotune) exist on CUDA only; elsewhere the same mode without them."""
    if mode is None or dev.type == "cuda":
        return mode
    return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def parity(a):
    """`--parity`: runs the legacy path eager, then each fast variant, on the
    same model and dump (CPU float32 unless told otherwise), and compares their
    losses with the legacy path's and with DUMP/losses.json (the Rust step's,
    from `bench-step --dump`) if present. Exits 1 beyond --parity-rtol."""
    import subprocess

    base = [sys.executable, os.path.abspath(__file__), "--model", a.model, "--dump", a.dump,
            "--device", a.device, "--dtype", a.dtype, "--steps", str(a.steps if a.steps is not None else 3)]
    if a.threads:
        base += ["--threads", str(a.threads)]
    variants = [("legacy eager", ["--impl", "legacy"])]
    for v in a.parity.split(","):
        name, _, mode = v.partition(":")
        extra = ["--impl", "fast"] + (["--no-fused"] if name == "fast-nofused" else [])
        variants.append((v, extra + (["--compile", mode] if mode else [])))
    rust = None
    path = os.path.join(a.dump, "losses.json")
    if os.path.exists(path):
        with open(path) as f:
            rust = json.load(f)["losses"]
    print(json.dumps({"select_device_vs_select": f"{check_select()} random batches identical"}))
    results, worst = {}, 0.0
    for name, extra in variants:
        t0 = time.perf_counter()
        out = subprocess.run(base + extra, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        line = json.loads(out.stdout.strip().splitlines()[-1])
        results[name] = line["losses"]
        ref = results["legacy eager"]
        rel = max(abs(x - r) / max(abs(r), 1e-12) for x, r in zip(line["losses"], ref))
        relr = None
        if rust is not None:
            relr = max(abs(x - r) / max(abs(r), 1e-12) for x, r in zip(line["losses"], rust))
        if name != "legacy eager":
            worst = max(worst, rel)
        print(json.dumps({"variant": name, "losses": line["losses"], "max_rel_vs_legacy": rel,
                          "max_rel_vs_rust": relr, "compile_mode": line.get("compile_mode"),
                          "fused_adamw": line.get("fused_adamw"), "wall_s": round(time.perf_counter() - t0, 1)}))
        sys.stdout.flush()
    ok = worst <= a.parity_rtol
    print(json.dumps({"parity": "ok" if ok else "FAILED", "worst_rel_vs_legacy": worst, "rtol": a.parity_rtol}))
    if not ok:
        raise SystemExit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--dump")
    ap.add_argument("--steps", type=int, default=None, help="default: the dump's total_steps")
    ap.add_argument("--impl", default="legacy", choices=["legacy", "fast"],
                    help="legacy: the step as first written (host selection, hooks, per-variable AdamW; "
                    "the CPU parity test's); fast: no host synchronisation, LoRA wrappers, fused AdamW")
    ap.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                    help="torch.compile (mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs; "
                    "bare --compile is default): legacy compiles the LlamaModel body, fast the whole step. "
                    "Off CUDA, reduce-overhead runs as default and max-autotune as max-autotune-no-cudagraphs")
    ap.add_argument("--no-fused", action="store_true",
                    help="fast: the legacy AdamW update (DeviceAdamW) instead of the fused kernel")
    ap.add_argument("--parity", metavar="VARIANTS", nargs="?", const="fast,fast-nofused,fast:default",
                    help="run the legacy path and these fast variants (comma-separated: fast, fast-nofused, "
                    "fast:MODE, fast-nofused:MODE) in subprocesses and compare losses (default: %(const)s)")
    ap.add_argument("--parity-rtol", type=float, default=1e-5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", metavar="FILE", help="after the timed steps, profile one more step; kernel table to FILE")
    ap.add_argument("--make-tiny", metavar="DIR", help="write a tiny random Llama checkpoint and exit")
    ap.add_argument("--tiny-layers", type=int, default=4)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.make_tiny:
        make_tiny(a.make_tiny, a.tiny_layers)
        return
    if not a.model or not a.dump:
        ap.error("--model and --dump are required")
    if a.parity:
        parity(a)
        return

    from transformers import AttentionInterface, LlamaForCausalLM

    AttentionInterface.register("kvd_explicit", explicit_attention)
    AttentionInterface.register("kvd_fast", fast_attention)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(dev)
    model.eval()
    model.requires_grad_(False)

    with open(os.path.join(a.dump, "batch.json")) as f:
        spec = json.load(f)
    batch, distill, train = spec["batch"], spec["distill"], spec["train"]
    assert train.get("grad_accum", 1) == 1
    tensors = load_file(os.path.join(a.dump, "adaptor.safetensors"))
    mode = compile_mode_for(a.compile, dev)
    if mode != a.compile:
        print(f"kvdistill_ref: --compile {a.compile} needs CUDA graphs; on {dev.type} it runs as {mode}",
              file=sys.stderr)
    fused = None
    if a.impl == "legacy":
        ad = Adaptor(tensors, distill, model.config.num_hidden_layers, dev)
        ad.install(model)
        params = [ad.p[n] for n in ad.names]
        opt = AdamW(params, train["weight_decay"])
        step = Step(model, ad, distill, mode)
    else:
        ad = FastAdaptor(tensors, distill, model.config.num_hidden_layers, dev)
        ad.install(model)
        model.config._attn_implementation = "kvd_fast"
        params = [ad.p[n] for n in ad.names]
        fopt = make_optimizer(params, train["weight_decay"], dev, not a.no_fused)
        fused = fopt.fused
        fstep = FastStep(model, ad, distill, train, batch, fopt, params)
        run = fstep.run if mode is None else torch.compile(fstep.run, mode=mode)
        graphs = dev.type == "cuda" and mode in ("reduce-overhead", "max-autotune")

    steps = a.steps if a.steps is not None else train["total_steps"]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses, norms = [], [], []

    def legacy_step(i):
        for p in params:
            p.grad = None
        loss, _, _, _ = step(batch)
        sq = sum(p.grad.double().pow(2).sum() for p in params if p.grad is not None)
        norm = math.sqrt(float(sq))
        norms.append(norm)
        if not math.isfinite(norm):
            raise SystemExit(f"non-finite gradient norm at step {i}")
        mx = train["max_grad_norm"]
        if mx > 0 and norm > mx:
            c = mx / (norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(c)
        opt.step(lr_at(train, i))
        return loss

    def fast_step(i):
        """No host synchronisation: the loss and the norm stay on the device
        (copied out of CUDA graph memory before the next replay)."""
        for p in params:
            p.grad = None
        fopt.prepare(lr_at(train, i))
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, norm = run()
        norms.append(norm.detach().clone())
        return loss.detach().clone()

    one_step = legacy_step if a.impl == "legacy" else fast_step
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = one_step(i)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    losses = [float(x) for x in losses]
    grad_norms = [float(n) for n in norms[:steps]]
    for i, n in enumerate(grad_norms):
        if not math.isfinite(n):
            raise SystemExit(f"non-finite gradient norm at step {i}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            one_step(steps - 1)
            sync()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        with open(a.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))
    timed = sorted(times[2:] if len(times) > 2 else times)
    median = timed[len(timed) // 2]
    tokens = sum(len(e["context"]) - 1 + len(e["suffix"]) for e in batch)
    line = {
        "model": a.model,
        "device": str(dev),
        "dtype": a.dtype,
        "ref_impl": a.impl,  # not "impl": gpu_step.sh prepends that key
        "compile": mode is not None,
        "compile_mode": mode,
        "fused_adamw": fused,
        "batch": len(batch),
        "median_s": median,
        "tokens_per_s": tokens / median,
        "step_s": [round(t, 6) for t in times],
        "losses": losses,
        "grad_norms": grad_norms,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
