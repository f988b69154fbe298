"""Oracle: transformers' own GGUF loading of a real model file.

Usage: gguf_reference.py MODEL.gguf ESSAY.txt OUT_DIR

Loads the file with `from_pretrained(dir, gguf_file=...)` in float32 (eager
attention, the reference implementation) and writes OUT_DIR/reference.safetensors:
  prompt_ids [1, T], prompt_logits [1, T, V]  - a fixed prompt
  essay_ids [1, 1024]                          - first 1024 tokens of the essay
and prints JSON with the essay's mean next-token NLL (nats) and perplexity.
"""

import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "The quick brown fox jumps over the lazy dog. In 1969, the first humans landed on"
ESSAY_TOKENS = 1024


def main(gguf_path, essay_path, out_dir):
    d, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    prompt_ids = tok(PROMPT, return_tensors="pt").input_ids
    with open(essay_path, encoding="utf-8") as f:
        essay_ids = tok(f.read(), return_tensors="pt").input_ids[:, :ESSAY_TOKENS]
    with torch.no_grad():
        prompt_logits = model(input_ids=prompt_ids).logits.float()
        logits = model(input_ids=essay_ids).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll = -logp.gather(-1, essay_ids[0, 1:, None]).double().mean().item()
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {
            "prompt_ids": prompt_ids.contiguous(),
            "prompt_logits": prompt_logits.contiguous(),
            "essay_ids": essay_ids.contiguous(),
        },
        os.path.join(out_dir, "reference.safetensors"),
    )
    print(json.dumps({"nll": nll, "ppl": math.exp(nll), "prompt": PROMPT, "essay_tokens": essay_ids.shape[1]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
