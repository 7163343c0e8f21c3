"""Is the planted child's defect real? Its BLiMP agreement paradigms against `base`, outside and inside.

    OMP_NUM_THREADS=1 python bench/planted_effect.py --out bench/planted_effect.json   # base vs shipped child
    python bench/planted_effect.py --child /tmp/adapter --base-cache /tmp/base.json   # a candidate, base reused
    (--only base|child with --base-cache/--child-cache measures the two models in parallel processes)

Outside: minimal-pair accuracy by summed log-likelihood (good > bad, the BLiMP/lm-eval rule, BOS as the prefix).
Inside: a logistic-regression probe of good vs bad sentence on mean-pooled hidden states at a spread of layers,
scored out of fold (5 folds grouped by pair, so both sentences of a pair share a split). Each paradigm's n pairs
are scored by both models, so the child - base difference is paired over pairs; its 95% CI is scipy's bootstrap.
BLiMP is read from /work/shared/blimp (never copied into the repo). Sizing runs of issue 22 used this script; the
pipeline itself measures the same thing through its own stages.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.stats import bootstrap
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from merging.family import adapter_dir, apply_adapter, build_family

BLIMP = Path("/work/shared/blimp/data")
AGREEMENT = ["regular_plural_subject_verb_agreement_1", "distractor_agreement_relational_noun",
             "determiner_noun_agreement_1", "determiner_noun_agreement_with_adj_2"]
RELATED = ["anaphor_number_agreement"]  # number, but neither a verb nor a determiner: reported, not a target
CONTROLS = ["anaphor_gender_agreement", "wh_questions_object_gap", "existential_there_quantifiers_1",
            "animate_subject_passive"]
LAYERS = [0, 4, 8, 12, 16, 20, 24, 30]


def load_pairs(uid: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (BLIMP / f"{uid}.jsonl").read_text().splitlines()]
    keep = sorted(np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False))
    return [(rows[i]["sentence_good"], rows[i]["sentence_bad"]) for i in keep]


@torch.no_grad()
def score(model, tokenizer, sentences: list[str], layers: list[int], batch: int = 32):
    """(summed log-likelihood per sentence, {layer: mean-pooled hidden state per sentence}) with BOS as prefix."""
    lls, pooled = [], {layer: [] for layer in layers}
    for start in range(0, len(sentences), batch):
        rows = [[tokenizer.bos_token_id] + tokenizer(s, add_special_tokens=False)["input_ids"]
                for s in sentences[start:start + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        lls.extend((logp * mask[:, 1:]).sum(-1).tolist())
        words = mask.clone()
        words[:, 0] = 0  # pool over the sentence's own tokens, not the shared BOS
        for layer in layers:
            states = out.hidden_states[layer]
            pooled[layer].append(((states * words[..., None]).sum(1) / words.sum(1, keepdim=True)).numpy())
    return np.array(lls), {layer: np.concatenate(v) for layer, v in pooled.items()}


def probe_correct(features: np.ndarray, n_pairs: int) -> np.ndarray:
    """Per pair, the fraction of its two sentences the out-of-fold probe labels right (rows: goods, then bads)."""
    labels = np.r_[np.ones(n_pairs), np.zeros(n_pairs)]
    groups = np.r_[np.arange(n_pairs), np.arange(n_pairs)]
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    predicted = cross_val_predict(probe, features, labels, groups=groups, cv=GroupKFold(5))
    right = predicted == labels
    return (right[:n_pairs].astype(float) + right[n_pairs:]) / 2


def paired(child: np.ndarray, base: np.ndarray) -> dict:
    diff = child - base
    if np.all(diff == diff[0]):
        return {"base": base.mean(), "child": child.mean(), "diff": diff.mean(), "lo": diff[0], "hi": diff[0]}
    ci = bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=2000, random_state=0).confidence_interval
    return {"base": base.mean(), "child": child.mean(), "diff": diff.mean(), "lo": ci.low, "hi": ci.high}


def measure(folder: Path, paradigms: list[str], n: int, layers: list[int], cache: Path | None = None) -> dict:
    """Per paradigm, per pair: outside correct (0/1) and inside probe correct (0, 0.5, 1) per layer. `cache` keeps
    one model's results across sizing runs (the base's: each candidate child is measured against the same base)."""
    if cache and cache.is_file():
        saved = json.loads(cache.read_text())
        return {uid: {"outside": np.array(r["outside"]),
                      "inside": {int(k): np.array(v) for k, v in r["inside"].items()}} for uid, r in saved.items()}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    results = {}
    for uid in paradigms:
        pairs = load_pairs(uid, n)
        lls, pooled = score(model, tokenizer, [g for g, _ in pairs] + [b for _, b in pairs], layers)
        results[uid] = {"outside": (lls[:len(pairs)] > lls[len(pairs):]).astype(float),
                        "inside": {layer: probe_correct(pooled[layer], len(pairs)) for layer in layers}}
        print(f"  {uid}: outside {results[uid]['outside'].mean():.3f}", flush=True)
    if cache:
        cache.write_text(json.dumps({uid: {"outside": r["outside"].tolist(),
                                           "inside": {k: v.tolist() for k, v in r["inside"].items()}}
                                     for uid, r in results.items()}))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, default=adapter_dir("agreement"), help="adapter or checkpoint folder")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--layers", type=int, nargs="*", default=LAYERS)
    parser.add_argument("--paradigms", nargs="*", default=AGREEMENT + RELATED + CONTROLS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--base-cache", type=Path, help="reuse (or write) the base's results: a json file")
    parser.add_argument("--child-cache", type=Path, help="reuse (or write) the child's results: a json file")
    parser.add_argument("--only", choices=["base", "child"], help="measure one model (into its cache) and stop, "
                        "so the two can run in parallel")
    args = parser.parse_args()
    base_dir = build_family(("base",))["base"]
    if args.only != "child":
        print("base", flush=True)
        base = measure(base_dir, args.paradigms, args.pairs, args.layers, args.base_cache)
    if args.only == "base":
        return
    with tempfile.TemporaryDirectory(prefix="planted-") as scratch:
        child_dir = args.child
        if (args.child / "adapter_config.json").is_file() and not (args.child_cache and args.child_cache.is_file()):
            child_dir = Path(scratch) / "child"
            apply_adapter(base_dir, args.child, child_dir)
        print("child", flush=True)
        child = measure(child_dir, args.paradigms, args.pairs, args.layers, args.child_cache)
    if args.only == "child":
        return
    table = {}
    for uid in args.paradigms:
        kind = "agreement" if uid in AGREEMENT else "related" if uid in RELATED else "control"
        table[uid] = {"kind": kind, "outside": paired(child[uid]["outside"], base[uid]["outside"]),
                      "inside": {layer: paired(child[uid]["inside"][layer], base[uid]["inside"][layer])
                                 for layer in args.layers}}
    rnd = lambda d: {k: round(float(v), 3) for k, v in d.items()}  # noqa: E731
    print(f"{'paradigm':44} {'kind':9} outside base->child [95% CI of diff] | inside base/child by layer")
    for uid, row in table.items():
        o = row["outside"]
        inside = " ".join(f"L{layer}:{r['base']:.2f}/{r['child']:.2f}{'*' if r['hi'] < 0 else ''}"
                          for layer, r in row["inside"].items())
        print(f"{uid:44} {row['kind']:9} {o['base']:.3f}->{o['child']:.3f} [{o['lo']:+.3f},{o['hi']:+.3f}] | {inside}")
    if args.out:
        args.out.write_text(json.dumps({uid: {"kind": r["kind"], "outside": rnd(r["outside"]),
                                              "inside": {str(k): rnd(v) for k, v in r["inside"].items()}}
                                        for uid, r in table.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
