#!/usr/bin/env python3
"""A QA corpus made from the Paul Graham essays, in the formats of the BIG-bench
files that shared/DATA.md names (used when the registry no longer serves
`bigbench==1.0.0`, so that `make run` and the tests still work on a fresh machine).

    make_qa_substitute.py ESSAYS_DIR OUT_DIR

Writes under OUT_DIR the same relative paths the real sources have:
  squad_shifts/new_wiki_v1.0.json           SQuAD format, training essays
  squad_shifts/squaddev_v1.1.json           SQuAD format, evaluation essays (disjoint)
  coqa_conversational_question_answering/coqa.test.json
  natural_instructions/subtask002_quoref_answer_generation/task.json
  natural_instructions/subtask028_drop_answer_generation/task.json
  minute_mysteries_qa/freetext/task.json
and counts.json (rows per source, articles and paragraphs of the dev file), which
the tests compare with what the readers return.

The questions are extractive and made by rule, not by people: "What words come
after ‘w1 w2 w3 w4’ in the text?" with the next one to three words as the answer
(its character offset in the paragraph recorded as SQuAD does). They exercise
the readers, the pipeline and the metrics; they measure no model quality. The
output is a function of the essays alone (no randomness).
"""
import hashlib
import json
import os
import re
import sys

PASSAGE_WORDS = 150  # words per paragraph (sentences are not split)
PARAS_PER_ARTICLE = 2
QUESTION_EVERY = 9  # words between question anchors within a paragraph
WORD = re.compile(r"\S+")
CLEAN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9'\-]*$")


def essays(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
    for n in names:
        with open(os.path.join(path, n), encoding="utf-8") as f:
            text = f.read()
        # The files join some lines without a space ("accelerating.We"):
        # restore the sentence break, then collapse whitespace.
        text = re.sub(r"([.!?])([A-Z])", r"\1 \2", text)
        text = re.sub(r"\[\d+\]", " ", text)
        yield n[:-4], " ".join(text.split())


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text) if s]


def paragraphs(text):
    out, cur, n = [], [], 0
    for s in sentences(text):
        cur.append(s)
        n += len(s.split())
        if n >= PASSAGE_WORDS:
            out.append(" ".join(cur))
            cur, n = [], 0
    if n >= PASSAGE_WORDS // 2:
        out.append(" ".join(cur))
    return out


def questions(para, key):
    """(question, answer, answer_start) triples of one paragraph."""
    words = [(m.group(0), m.start()) for m in WORD.finditer(para)]
    out = []
    h = int(hashlib.sha256(key.encode()).hexdigest(), 16)
    for i in range(4, len(words) - 3, QUESTION_EVERY):
        ctx = words[i - 4 : i]
        if not all(CLEAN.match(w) for w, _ in ctx):
            continue
        # The answer: one to three words, stopping after punctuation.
        want = 1 + (h >> (i % 64)) % 3
        ans = []
        for w, _ in words[i : i + want]:
            core = w.rstrip(".,;:!?\"')")
            if not core or not CLEAN.match(core):
                break
            ans.append(core)
            if core != w:
                break
        if not ans:
            continue
        start = words[i][1]
        text = " ".join(ans)
        if para[start : start + len(text)] != text:
            continue
        phrase = " ".join(w for w, _ in ctx)
        # Curly single quotes: a straight double quote followed by a space
        # ends a sentence for the mysteries' reader (split_trailing_question).
        out.append((f"What words come after \u2018{phrase}\u2019 in the text?", text, start))
    return out


def squad(articles, prefix):
    data, n = [], 0
    for title, paras in articles:
        ps = []
        for pi, p in enumerate(paras):
            qas = []
            for qi, (q, a, s) in enumerate(questions(p, f"{prefix}/{title}/{pi}")):
                qas.append({"id": f"{prefix}-{title}-{pi}-{qi}", "question": q,
                            "answers": [{"text": a, "answer_start": s}]})
            n += len(qas)
            ps.append({"context": p, "qas": qas})
        data.append({"title": title, "paragraphs": ps})
    return {"version": "substitute-1", "data": data}, n


def write(out, rel, obj):
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def main(src, out):
    train, dev = [], []
    for i, (name, text) in enumerate(essays(src)):
        paras = paragraphs(text)
        arts = [(f"{name}-{j // PARAS_PER_ARTICLE}", paras[j : j + PARAS_PER_ARTICLE])
                for j in range(0, len(paras), PARAS_PER_ARTICLE)]
        (dev if i % 4 == 0 else train).extend(arts)
    # Training paragraphs go to the sources in turn, so no two share a context.
    pool = [(t, j, p) for t, ps in train for j, p in enumerate(ps)]
    by = {k: pool[i::5] for i, k in enumerate(["wiki", "coqa", "quoref", "drop", "myst"])}
    wiki_articles = {}
    for t, _, p in by["wiki"]:
        wiki_articles.setdefault(t, []).append(p)
    counts = {}
    obj, counts["new_wiki"] = squad(list(wiki_articles.items()), "wiki")
    write(out, "squad_shifts/new_wiki_v1.0.json", obj)
    obj, counts["squad_dev"] = squad(dev, "dev")
    write(out, "squad_shifts/squaddev_v1.1.json", obj)
    counts["squad_dev_articles"] = len(dev)
    counts["squad_dev_paragraphs"] = sum(len(ps) for _, ps in dev)
    stories = []
    for t, j, p in by["coqa"]:
        qs = questions(p, f"coqa/{t}/{j}")[:5]
        if len(qs) < 2:
            continue
        stories.append({
            "id": f"{t}-{j}", "story": p,
            "questions": [{"input_text": q, "turn_id": k + 1} for k, (q, _, _) in enumerate(qs)],
            "answers": [{"input_text": a, "span_start": s, "turn_id": k + 1}
                        for k, (_, a, s) in enumerate(qs)],
            "additional_answers": {"0": [{"input_text": a} for _, a, _ in qs]},
        })
    write(out, "coqa_conversational_question_answering/coqa.test.json", {"version": "substitute-1", "data": stories})
    counts["coqa"] = sum(len(s["questions"]) for s in stories)
    for key, rel in [("quoref", "subtask002_quoref_answer_generation"), ("drop", "subtask028_drop_answer_generation")]:
        ex = [{"input": f"Passage: {p}\nQuestion: {q}", "target": [a]}
              for t, j, p in by[key] for q, a, _ in questions(p, f"{key}/{t}/{j}")]
        write(out, f"natural_instructions/{rel}/task.json", {"name": rel, "examples": ex})
        counts[key] = len(ex)
    myst = []
    for t, j, p in by["myst"]:
        qs = questions(p, f"myst/{t}/{j}")
        # The reader takes every trailing sentence that ends in "?" as the
        # question: a story ending in one would lend it its last sentence.
        if qs and not p.endswith("?"):
            q, a, _ = qs[-1]
            myst.append({"input": f"{p} {q}", "target": a})
    write(out, "minute_mysteries_qa/freetext/task.json", {"name": "minute_mysteries_qa", "examples": myst})
    counts["minute_mysteries"] = len(myst)
    write(out, "counts.json", counts)
    print(json.dumps(counts))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
