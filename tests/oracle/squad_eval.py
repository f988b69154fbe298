"""Oracle: the official SQuAD v1.1 metric (evaluate-v1.1.py), verbatim in substance.

Usage: squad_eval.py ITEMS.json
ITEMS.json holds [{"prediction": str, "answers": [str, ...]}, ...]. Prints JSON:
{"items": [{"normalized": str, "em": bool, "f1": float}, ...],
 "exact_match": float, "f1": float}  (corpus scores in percent, as evaluate()).
"""

import json
import re
import string
import sys
from collections import Counter


# --- from the official evaluate-v1.1.py ---------------------------------------
def normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def exact_match_score(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)
# ------------------------------------------------------------------------------


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        items = json.load(f)
    out = []
    em_total = f1_total = 0
    for it in items:
        pred, golds = it["prediction"], it["answers"]
        em = metric_max_over_ground_truths(exact_match_score, pred, golds)
        f1 = metric_max_over_ground_truths(f1_score, pred, golds)
        em_total += em
        f1_total += f1
        out.append({"normalized": normalize_answer(pred), "em": bool(em), "f1": float(f1)})
    n = len(items)
    json.dump(
        {
            "items": out,
            "exact_match": 100.0 * em_total / n if n else 0.0,
            "f1": 100.0 * f1_total / n if n else 0.0,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
