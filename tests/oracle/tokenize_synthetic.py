"""Oracle for the tokenizer tests on small synthetic GGUF files.

Usage: tokenize_synthetic.py OUT_DIR

Writes tokenizer-only GGUF files (no tensors) with gguf-py into OUT_DIR, covering the
builders the real test models do not reach:

    llama.gguf   SentencePiece-style "llama" model, architecture llama: merges recovered
                 from the scores, Metaspace pre-tokenizer, BOS added by default,
                 a user-defined and a control token, a chat template.
    phi3.gguf    the same vocabulary, architecture phi3 (Prepend/Replace normalizer),
                 add_bos_token false, add_eos_token true.
    qwen2.gguf   byte-level "gpt2" model, architecture qwen2, tokenizer.ggml.pre "qwen2"
                 (split regex), merges in the file, control tokens (one not spelled in the
                 byte alphabet), a token respelled byte by byte, a ChatML template,
                 tokenizer.ggml.eot_token_id.

and malformed ones (bad_*.gguf) for the error tests. For each well-formed file it runs the
same oracle as tokenize_gguf.py (saving the HF directory to OUT_DIR/<name>_hf).

It also writes two small hand-made HF directories that reach the config handling a saved
GGUF tokenizer does not (tokenizer.json without post-processor, ignored add_bos_token,
model-specific `*_token`, additional_special_tokens, added_tokens_decoder, chat template
list, clean_up_tokenization_spaces; legacy special_tokens_map.json, chat_template.jinja
overriding the config) and loads them with `AutoTokenizer.from_pretrained(dir)`. Prints

    {"gguf": {"<name>": {"path": str, "hf_dir": str, "gguf": SIDE, "hf": SIDE}, ...},
     "hf_dirs": {"<name>": {"hf_dir": str, "hf": SIDE}, ...}}
"""

import json
import os
import sys

import gguf

from tokenize_gguf import TEXTS, oracle, side
from transformers import AutoTokenizer

CONTROL, USER_DEFINED, NORMAL, UNKNOWN, BYTE = 3, 4, 1, 2, 6

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) and message['role'] != 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "[{{ message['role'] | upper }}] {{ message['content'] | trim }}{% if not loop.last %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}\n[ASSISTANT]{% endif %}"
)

CHATML_TEMPLATE = """{%- if messages[0].role != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


WORD_LEVEL = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [],
    "normalizer": None,
    "pre_tokenizer": {"type": "BertPreTokenizer"},
    "post_processor": None,
    "decoder": None,
    "model": {
        "type": "WordLevel",
        "vocab": {"<unk>": 0, "hello": 1, "world": 2, "<s>": 3, ",": 4, ".": 5, "'": 6, "s": 7, "n": 8, "t": 9},
        "unk_token": "<unk>",
    },
}

HF_DIRS = {
    # No post-processor in tokenizer.json; add_bos_token/add_eos_token are ignored.
    "tiny_config": {
        "tokenizer.json": WORD_LEVEL,
        "tokenizer_config.json": {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_bos_token": True,
            "add_eos_token": True,
            "image_token": "<img>",
            "extra_special_tokens": [],
            "additional_special_tokens": ["<x>"],
            "added_tokens_decoder": {
                "11": {"content": "<y>", "lstrip": False, "normalized": True, "rstrip": False,
                       "single_word": False, "special": False},
            },
            "clean_up_tokenization_spaces": True,
            "chat_template": [
                {"name": "default", "template": "{{ bos_token }}{{ image_token }}{{ messages[0].content }}"},
                {"name": "tool_use", "template": "unused"},
            ],
        },
        "generation_config.json": {"eos_token_id": [10, 2]},
    },
    # A post-processor adding <s>, legacy special_tokens_map.json, chat_template.jinja.
    "tiny_legacy": {
        "tokenizer.json": {
            **WORD_LEVEL,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [3], "tokens": ["<s>"]}},
            },
        },
        "tokenizer_config.json": {
            "bos_token": "<unk>",
            "split_special_tokens": False,
            "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
        },
        "special_tokens_map.json": {
            "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False},
            "eos_token": "</s>",
            "additional_special_tokens": ["<z>"],
        },
        "chat_template.jinja": "{{ eos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}\n",
    },
}


def sentencepiece_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    pieces = [
        "\u2581", "e", "t", "a", "o", "n", "h", "s", "i", "r", "d", "l", "\u2581t", "he", "\u2581the",
        "\u2581a", "in", "\u2581in", "er", "\u2581w", "or", "an", "on", "\u2581h", "\u2581s", "ll",
        "\u2581he", "llo", "\u2581hello", "\u2581wor", "\u2581world", "\u2581\u2581",
        "\u2581\u2581\u2581\u2581", "\n", "\u00e9", "\u65e5", "\u672c", "\u65e5\u672c", "H", "\u2581H",
        "\u2581He", "\u2581Hello",
    ]
    for c in "bcfgjkmpquvwxyzABCDEFGIJKLMNOPQRSTUVWXYZ0123456789.,!?'-":
        if c not in pieces:
            pieces.append(c)
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(-i / 3.0)
    for token, token_type in [("<think>", USER_DEFINED), ("<|end|>", CONTROL)]:
        tokens.append(token)
        types.append(token_type)
        scores.append(0.0)
    return tokens, types, scores


def byte_level_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|stop|>"]
    types = [CONTROL] * 4
    tokens += alphabet
    types += [NORMAL] * len(alphabet)
    merges = [
        "\u0120 t", "h e", "\u0120t he", "l l", "ll o", "\u0120 w", "o r", "\u0120w or", "l d",
        "\u0120wor ld", "\u0120 \u0120", "1 2", "\u010a \u010a", "H e", "He llo", "i n", "\u0120 in",
    ]
    for merge in merges:
        tokens.append(merge.replace(" ", ""))
        types.append(NORMAL)
    # Not spelled in the byte alphabet: a control token (skipped by transformers) and a
    # normal one (respelled byte by byte).
    tokens += ["<\uff5cend\u2581of\u2581sentence\uff5c>", "\u65e5\u672c"]
    types += [CONTROL, NORMAL]
    tokens.append("<think>")
    types.append(USER_DEFINED)
    return tokens, types, merges


def write(path, arch, kv):
    """A GGUF with the given metadata (key -> (kind, value)) and no tensors."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    for key, (kind, value) in kv.items():
        if kind == "str":
            writer.add_string(key, value)
        elif kind == "u32":
            writer.add_uint32(key, value)
        elif kind == "bool":
            writer.add_bool(key, value)
        elif kind == "strs":
            writer.add_array(key, value)
        elif kind == "i32s":
            writer.add_array(key, [int(v) for v in value])
        elif kind == "f32s":
            writer.add_array(key, [float(v) for v in value])
        else:
            raise ValueError(kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = os.path.abspath(sys.argv[1])
    os.makedirs(out_dir, exist_ok=True)

    sp_tokens, sp_types, sp_scores = sentencepiece_vocab()
    sp = {
        "tokenizer.ggml.model": ("str", "llama"),
        "tokenizer.ggml.tokens": ("strs", sp_tokens),
        "tokenizer.ggml.token_type": ("i32s", sp_types),
        "tokenizer.ggml.scores": ("f32s", sp_scores),
        "tokenizer.ggml.bos_token_id": ("u32", 1),
        "tokenizer.ggml.eos_token_id": ("u32", 2),
        "tokenizer.ggml.unknown_token_id": ("u32", 0),
    }
    bl_tokens, bl_types, bl_merges = byte_level_vocab()
    bl = {
        "tokenizer.ggml.model": ("str", "gpt2"),
        "tokenizer.ggml.pre": ("str", "qwen2"),
        "tokenizer.ggml.tokens": ("strs", bl_tokens),
        "tokenizer.ggml.token_type": ("i32s", bl_types),
        "tokenizer.ggml.merges": ("strs", bl_merges),
        "tokenizer.ggml.eos_token_id": ("u32", 2),
        "tokenizer.ggml.padding_token_id": ("u32", 0),
        "tokenizer.ggml.eot_token_id": ("u32", 3),
        "tokenizer.chat_template": ("str", CHATML_TEMPLATE),
    }
    valid = {
        "llama": ("llama", {**sp, "tokenizer.chat_template": ("str", LLAMA_TEMPLATE)}),
        "phi3": (
            "phi3",
            {
                **sp,
                "tokenizer.ggml.add_bos_token": ("bool", False),
                "tokenizer.ggml.add_eos_token": ("bool", True),
            },
        ),
        "qwen2": ("qwen2", bl),
    }
    without = lambda d, *keys: {k: v for k, v in d.items() if k not in keys}  # noqa: E731
    invalid = {
        "bad_no_tokens": ("llama", without(sp, "tokenizer.ggml.tokens")),
        "bad_no_model": ("llama", without(sp, "tokenizer.ggml.model")),
        "bad_model": ("llama", {**sp, "tokenizer.ggml.model": ("str", "bert")}),
        "bad_no_merges": ("qwen2", without(bl, "tokenizer.ggml.merges")),
        "bad_bos_range": ("llama", {**sp, "tokenizer.ggml.bos_token_id": ("u32", 100000)}),
        "bad_merge_entry": ("qwen2", {**bl, "tokenizer.ggml.merges": ("strs", ["h e", "a b c"])}),
        "bad_merge_oov": ("qwen2", {**bl, "tokenizer.ggml.merges": ("strs", ["\u0120 t", "q z"])}),
        "bad_tokens_type": ("llama", {**sp, "tokenizer.ggml.tokens": ("i32s", list(range(300)))}),
    }
    for name, (arch, kv) in invalid.items():
        write(os.path.join(out_dir, f"{name}.gguf"), arch, kv)

    result = {"gguf": {}, "hf_dirs": {}}
    for name, (arch, kv) in valid.items():
        path = os.path.join(out_dir, f"{name}.gguf")
        write(path, arch, kv)
        hf_dir = os.path.join(out_dir, f"{name}_hf")
        result["gguf"][name] = {"path": path, "hf_dir": hf_dir, **oracle(path, hf_dir, TEXTS)}

    texts = TEXTS + ["hello, world. <x> <img> <y> </s> <z> <s>", "hello world , . ! ? 's n't"]
    for name, files in HF_DIRS.items():
        hf_dir = os.path.join(out_dir, name)
        os.makedirs(hf_dir, exist_ok=True)
        for file_name, content in files.items():
            with open(os.path.join(hf_dir, file_name), "w", encoding="utf-8") as f:
                f.write(content if isinstance(content, str) else json.dumps(content))
        result["hf_dirs"][name] = {"hf_dir": hf_dir, "hf": side(AutoTokenizer.from_pretrained(hf_dir), texts)}
    json.dump(result, sys.stdout, ensure_ascii=True)


if __name__ == "__main__":
    main()
