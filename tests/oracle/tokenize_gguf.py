"""Oracle for the tokenizer tests: what HF transformers does with a GGUF tokenizer.

Usage: tokenize_gguf.py GGUF_PATH OUT_DIR [TEXT_FILE...]

Loads `AutoTokenizer.from_pretrained(dirname(GGUF_PATH), gguf_file=basename(GGUF_PATH))`,
saves it with `save_pretrained(OUT_DIR)` (tokenizer.json, tokenizer_config.json,
chat_template.jinja), loads that directory back with `AutoTokenizer.from_pretrained(OUT_DIR)`,
and prints one JSON object to stdout:

    {"gguf": SIDE, "hf": SIDE}

where SIDE is, for that tokenizer:

    {"class": str, "len": len(tok), "bos_token_id": int|null, "eos_token_id": int|null,
     "special_tokens_map": {...},
     "cases": [{"text", "ids_special", "ids_plain", "decode", "decode_skip", "decode_plain"}],
     "chats": [{"messages", "add_generation_prompt", "rendered": str|null,
                "error": null|{"kind": "no_template"|"template", "message": str}}]}

`ids_special` / `ids_plain` are `tok(text, add_special_tokens=True/False)["input_ids"]`;
`decode` / `decode_skip` decode `ids_special` with skip_special_tokens False/True, and
`decode_plain` decodes `ids_plain`. `rendered` is `apply_chat_template(messages,
tokenize=False, add_generation_prompt=...)`; it is null when there is no template or the
template raises (`error` says which, with the message).
Every TEXT_FILE's content is added as one more text.
"""

import json
import os
import sys

import jinja2
from transformers import AutoTokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  multiple   spaces  inside  ",
    "   ",
    " ",
    "a",
    "line one\nline two\n\nline four\r\nwindows line\rold mac",
    "\ttabs\tand\t\ttabs and\t \tmixed",
    "\n\n\n",
    "digits 0123456789 3.14159 1,000,000 2024-01-01 +1e-10",
    "Café naïve résumé Ångström façade Übergrößenträger",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🇫🇷",
    "Ελληνικά кириллица עברית العربية हिन्दी ไทย",
    "nbsp\u00a0thin\u2009ideographic\u3000space zero\u200bwidth",
    "control \u0001\u0007\u001b chars \u007f and \u0085",
    "def f(x):\n    return x ** 2  # square\n\nfor i in range(10):\n\tprint(f'{i}: {f(i)}')\n",
    'fn main() { let v: Vec<u8> = vec![0x00, 0xff]; println!("{:?}", v); }',
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask> <s></s>",
    "<|endoftext|>text<|endoftext|> <|im_start|><|im_end|>",
    "text with <start_of_image> and [multimodal] and <think>",
    "<0x41> ▁▁already▁spaced ▁",
    "don't can't I'm we've they're it's You'LL",
    "ab" * 150,
    "",
]

CHATS = [
    (
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy? Answer in one word."},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        False,
    ),
    (
        [
            {"role": "system", "content": "You are terse.\nAnswer briefly."},
            {"role": "user", "content": "  Héllo 日本 😀\n\tbye  "},
        ],
        True,
    ),
]


def side(tok, texts):
    cases = []
    for text in texts:
        ids_special = tok(text, add_special_tokens=True)["input_ids"]
        ids_plain = tok(text, add_special_tokens=False)["input_ids"]
        cases.append(
            {
                "text": text,
                "ids_special": ids_special,
                "ids_plain": ids_plain,
                "decode": tok.decode(ids_special, skip_special_tokens=False),
                "decode_skip": tok.decode(ids_special, skip_special_tokens=True),
                "decode_plain": tok.decode(ids_plain, skip_special_tokens=False),
            }
        )
    chats = []
    for messages, add_generation_prompt in CHATS:
        rendered, error = None, None
        if tok.chat_template is None:
            error = {"kind": "no_template", "message": "no chat template"}
        else:
            try:
                rendered = tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except jinja2.exceptions.TemplateError as e:
                error = {"kind": "template", "message": str(e)}
        chats.append(
            {
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "rendered": rendered,
                "error": error,
            }
        )
    return {
        "class": type(tok).__name__,
        "len": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "special_tokens_map": tok.special_tokens_map,
        "cases": cases,
        "chats": chats,
    }


def oracle(gguf_path, out_dir, texts):
    """`{"gguf": SIDE, "hf": SIDE}` for one GGUF file; saves the HF directory to `out_dir`."""
    gguf_path = os.path.abspath(gguf_path)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    result = {"gguf": side(tok, texts)}
    tok.save_pretrained(out_dir)
    del tok
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    result["hf"] = side(reloaded, texts)
    return result


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    texts = list(TEXTS)
    for path in sys.argv[3:]:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    json.dump(oracle(sys.argv[1], sys.argv[2], texts), sys.stdout, ensure_ascii=True)


if __name__ == "__main__":
    main()
