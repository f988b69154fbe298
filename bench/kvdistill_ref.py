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

Inputs come from `kv-distill bench-step --model DIR --dump DUMP`: DUMP/adaptor.safetensors
(the adaptor's initial tensors), DUMP/batch.json (batch, method and optimizer
settings). Both sides load the same HF checkpoint DIR.

Usage:
  kvdistill_ref.py --model DIR --dump DUMP [--steps N] [--compile]
                   [--device cpu|cuda] [--dtype f32|bf16]
  kvdistill_ref.py --make-tiny DIR   # writes a tiny random Llama checkpoint

Prints one JSON line: median_s, tokens_per_s, losses (one per step, before its
update, as bench-step's), peak_memory_gib (CUDA).
"""

import argparse
import json
import math
import os
import struct
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


def kl_mix(teacher, student, a, tau, chunk):
    """loss.rs: value and analytic gradient of a*KL(p_T||p_S) + (1-a)*KL(p_S||p_T)."""
    with torch.no_grad():
        rows = student.shape[0]
        grad = torch.zeros_like(student)
        fsum = rsum = 0.0
        chunk = max(chunk, 1)
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
            fsum += fkl.double().sum().item()
            rsum += rkl.double().sum().item()
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
    def __init__(self, model, adaptor, distill, compile_model):
        self.model = model
        self.adaptor = adaptor
        self.cfg = distill
        self.body = torch.compile(model.model) if compile_model else model.model
        self.features = None
        layer = distill["scorer_layer"]
        assert 1 <= layer <= model.config.num_hidden_layers

        def capture(module, inputs, out):
            self.features = out[0] if isinstance(out, tuple) else out

        model.model.layers[layer - 1].register_forward_hook(capture)
        # The cache argument is `cache` in recent transformers 5.x and
        # `past_key_values` before (an unknown keyword is silently ignored).
        import inspect

        params = inspect.signature(type(model.model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

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
        # The output's cache is `past_key_values` in most transformers
        # versions, `cache` in some 5.x ones; its layers are `.layers` from
        # 4.56 on, key/value lists before.
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
        slot_scores = scores.gather(1, idx)

        # Decoder over the suffix at the original positions, with the score feed.
        if cfg["score_feed"] == "straight_through":
            fed = slot_scores - slot_scores.detach()
        else:
            fed = slot_scores
        bias = torch.cat([fed * span_slot, torch.zeros(b, lx, device=dev)], 1)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--dump")
    ap.add_argument("--steps", type=int, default=None, help="default: the dump's total_steps")
    ap.add_argument("--compile", action="store_true", help="torch.compile the LlamaModel body")
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

    from transformers import AttentionInterface, LlamaForCausalLM

    AttentionInterface.register("kvd_explicit", explicit_attention)
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
    ad = Adaptor(tensors, distill, model.config.num_hidden_layers, dev)
    ad.install(model)
    params = [ad.p[n] for n in ad.names]
    opt = AdamW(params, train["weight_decay"])
    step = Step(model, ad, distill, a.compile)

    steps = a.steps if a.steps is not None else train["total_steps"]
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses = [], []
    def one_step(i):
        for p in params:
            p.grad = None
        loss, _, _, _ = step(batch)
        sq = sum(p.grad.double().pow(2).sum() for p in params if p.grad is not None)
        norm = math.sqrt(float(sq))
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

    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = one_step(i)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
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
        "compile": a.compile,
        "batch": len(batch),
        "median_s": median,
        "tokens_per_s": tokens / median,
        "losses": losses,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
