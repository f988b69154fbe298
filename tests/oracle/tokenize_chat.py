"""Oracle for chat templates: renders with transformers' own Jinja environment.

Usage: tokenize_chat.py CASES_JSON

CASES_JSON holds a list of
    {"template": str, "messages": [{"role", "content"}], "add_generation_prompt": bool,
     "special_tokens": {"bos_token": str, ...}}
Each case is rendered with `transformers.utils.chat_template_utils.render_jinja_template`, the
function `apply_chat_template(..., tokenize=False)` calls (the special tokens are passed the
way it passes `special_tokens_map`). Prints a JSON list, one entry per case:
    {"rendered": str, "error": null} or {"rendered": null, "error": str}
where `error` is the message of a `jinja2.TemplateError` (e.g. from `raise_exception`).
"""

import json
import sys

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    results = []
    for case in cases:
        try:
            rendered, _ = render_jinja_template(
                # Role first, as chat messages are normally written (the JSON may sort keys).
                conversations=[[{"role": m["role"], "content": m["content"]} for m in case["messages"]]],
                chat_template=case["template"],
                add_generation_prompt=case["add_generation_prompt"],
                **case["special_tokens"],
            )
            results.append({"rendered": rendered[0], "error": None})
        except jinja2.exceptions.TemplateError as e:
            results.append({"rendered": None, "error": str(e)})
    json.dump(results, sys.stdout, ensure_ascii=True)


if __name__ == "__main__":
    main()
