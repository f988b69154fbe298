"""Writes SmolLM2's tokenizer.json (from the GGUF file, through transformers) to
argv[2]; with argv[3] (a text file) also prints transformers' ids of that text
(no special tokens) as JSON. Used by the kvd-data tests and `make bench`."""
import json
import os
import sys

from transformers import AutoTokenizer

gguf, out = sys.argv[1], sys.argv[2]
if not os.path.exists(os.path.join(out, "tokenizer.json")):
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok.save_pretrained(out)
if len(sys.argv) > 3:
    tok = AutoTokenizer.from_pretrained(out)
    print(json.dumps(tok(open(sys.argv[3], encoding="utf-8").read(), add_special_tokens=False)["input_ids"]))
