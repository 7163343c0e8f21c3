"""Functional similarity between every pair of models, from their stored captures of the unlabeled set.

What each model stores (`functional_jobs`, written by the per-model capture step): every probing layer's token
states (bfloat16), every block's attention pattern (causal triangle, bfloat16) and the top-k next-token
log-probs + remaining mass. Features compare two models' stored captures one layer at a time, so no two models
are ever loaded together, and no feature needs the vocabulary-sized distribution of more than k tokens.

KL(p_a ‖ p_b) with top-k storage: over a's k most likely tokens + one bucket for the rest of a's mass; p_b is
known exactly where the token is in b's top k, and elsewhere b's remaining mass is spread evenly over the tokens
outside b's top k. Exact when k covers the vocabulary; the error on SmolLM2 is measured in bench/bench_capture.py.
"""

from __future__ import annotations

import time
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl
import torch

from probing.capture import HookRequest, PackedPattern, Tokens, TopK
from probing.hooks import LOGITS_HOOK, layer_hooks, pattern_hooks
from probing.similarity.registry import conform, summary_rows
from probing.similarity.unlabeled import TokenWindows
from probing.store import CaptureJob, CaptureStore, ModelRef
from reports.cache import cache_key, code_version, record
from reports.tables import read_cached, write_parquet

TOP_K = 1024
LOG_FLOOR = -100.0  # log q_b floor (e^-100): a token b gives exactly zero mass would make KL infinite


def functional_jobs(windows: TokenWindows, n_blocks: int, top_k: int = TOP_K,
                    batch_tokens: int = 1024) -> list[CaptureJob]:
    """Every layer's tokens, every block's attention pattern and the top-k next-token log-probs; a smaller token
    budget than the probes' since each token also holds a vocab-wide logits row and eager attention patterns."""
    requests = [HookRequest(h, Tokens()) for h in layer_hooks(n_blocks)]
    requests += [HookRequest(h, PackedPattern()) for h in pattern_hooks(n_blocks)]
    requests.append(HookRequest(LOGITS_HOOK, TopK(top_k)))
    return [CaptureJob(windows, tuple(requests), batch_tokens)]


def activation_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens (rows) of cos(x_t, y_t)."""
    return torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean().item()


def cka_side(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """One model's half of linear CKA: its column-centred features and ‖XᵀX‖_F (computed once per layer)."""
    x = x.to(dtype)
    x = x - x.mean(0)
    return x, torch.linalg.matrix_norm(x.T @ x)


def linear_cka(x: torch.Tensor | tuple, y: torch.Tensor | tuple) -> float:
    """Linear CKA of [n, d_x] and [n, d_y] token features (Kornblith et al. 2019, linear kernel on centred
    features): ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F). Either side may be a precomputed `cka_side`. Hand-written: no
    maintained library ships CKA for torch tensors."""
    (x, norm_x), (y, norm_y) = (side if isinstance(side, tuple) else cka_side(side) for side in (x, y))
    return (torch.linalg.matrix_norm(y.T @ x) ** 2 / (norm_x * norm_y)).item()


def pattern_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per head: cosine of the flattened attention patterns [windows, heads, ...] -> [heads]."""
    a, b = a.double().transpose(0, 1).flatten(1), b.double().transpose(0, 1).flatten(1)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _tokens_first(top: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A TopK capture as ([n, k] log-probs, [n, k] ids, [n] log rest) over all n tokens."""
    return top["logprobs"].flatten(0, -2).double(), top["indices"].flatten(0, -2), top["log_rest"].flatten().double()


def topk_kl(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Per-token KL(p_a ‖ p_b) in nats from two TopK captures; see the module docstring. b's log-prob of each of
    a's top tokens is looked up by binary search in b's sorted token ids: O(n·k log k) time, O(n·k) memory."""
    (logp_a, idx_a, rest_a), (logp_b, idx_b, rest_b) = _tokens_first(a), _tokens_first(b)
    sorted_b, order = idx_b.sort(dim=-1)
    position = torch.searchsorted(sorted_b, idx_a).clamp(max=sorted_b.shape[-1] - 1)
    found = sorted_b.gather(-1, position) == idx_a
    outside = max(vocab_size - idx_b.shape[-1], 1)
    log_q = torch.where(found, logp_b.gather(-1, order.gather(-1, position)),
                        (rest_b - np.log(outside))[:, None]).clamp(min=LOG_FLOOR)
    q_rest = (1.0 - log_q.exp().sum(-1)).clamp(min=1e-30)
    r_a = rest_a.exp()
    return (logp_a.exp() * (logp_a - log_q)).sum(-1) + torch.xlogy(r_a, r_a) - torch.xlogy(r_a, q_rest)


def _layer(store: CaptureStore, job: CaptureJob, request: HookRequest, model: ModelRef, precision: str):
    return store.load(job.key(request, model.digest, precision))


def functional_features(models: list[ModelRef], windows: TokenWindows, store: CaptureStore, precision: str,
                        top_k: int = TOP_K, pairs: list[tuple[ModelRef, ModelRef]] | None = None) -> pl.DataFrame:
    """similarity.parquet rows (source functional) for every pair of `models` (KL: both orders of each pair), or
    for `pairs` of them only (each model's captures are still read once per layer).

    Layer numbering as in probing: `activation_cosine`/`cka` layer 0 = embeddings, i = after block i-1;
    `attention_cosine` rows of block i carry layer i + 1 (the residual layer that block writes) and `head`.
    """
    pairs = list(combinations(models, 2)) if pairs is None else pairs
    models = [m for m in models if any(m in pair for pair in pairs)]
    jobs = {m.name: functional_jobs(windows, m.n_blocks, top_k)[0] for m in models}
    if len({m.n_blocks for m in models}) > 1:
        raise ValueError(f"functional similarity needs models of one depth; got {[m.n_blocks for m in models]}")
    rows: list[dict] = []
    per_pair: dict[tuple[str, str, str], list[float]] = {}
    n_tokens = windows.n_rows * windows.window

    def requests(kind):
        return [r for r in jobs[models[0].name].requests if isinstance(r.reducer, kind)]

    for layer, request in enumerate(requests(Tokens)):
        states = {m.name: _layer(store, jobs[m.name], request, m, precision)["value"].float().flatten(0, 1)
                  for m in models}
        # float32 products: the d×d cross products dominate the stage's time; CKA's relative error stays ~1e-6
        sides = {name: cka_side(x, torch.float32) for name, x in states.items()}
        for a, b in pairs:
            for feature, value in (("activation_cosine", activation_cosine(states[a.name], states[b.name])),
                                   ("cka", linear_cka(sides[a.name], sides[b.name]))):
                per_pair.setdefault((a.name, b.name, feature), []).append(value)
                rows.append({"model_a": a.name, "model_b": b.name, "feature": feature, "scope": "layer",
                             "layer": layer, "value": value, "n": n_tokens})
    for block, request in enumerate(requests(PackedPattern)):
        patterns = {m.name: _layer(store, jobs[m.name], request, m, precision)["value"] for m in models}
        for a, b in pairs:
            values = pattern_cosine(patterns[a.name], patterns[b.name]).tolist()
            per_pair.setdefault((a.name, b.name, "attention_cosine"), []).extend(values)
            rows += [{"model_a": a.name, "model_b": b.name, "feature": "attention_cosine", "scope": "head",
                      "layer": block + 1, "head": head, "value": v, "n": n_tokens} for head, v in enumerate(values)]
    (logits,) = requests(TopK)
    top = {m.name: _layer(store, jobs[m.name], logits, m, precision) for m in models}
    for a, b in [ordered for pair in pairs for ordered in (pair, pair[::-1])]:
        per_pair[(a.name, b.name, "kl")] = topk_kl(top[a.name], top[b.name], b.vocab_size).tolist()
    for (a, b, feature), values in per_pair.items():
        rows += summary_rows(values, model_a=a, model_b=b, feature=feature)
    return conform(pl.DataFrame(rows, infer_schema_length=None).with_columns(source=pl.lit("functional")))


def cached_functional_features(models: list[ModelRef], windows: TokenWindows, store: CaptureStore, precision: str,
                               top_k: int = TOP_K) -> pl.DataFrame:
    """`functional_features` for every pair, each pair's rows cached beside the capture store by the capture keys
    of both models and this code: adding a model computes only the pairs it is in. Rows come in the same order
    whatever was cached (pairs in `models` order), so a resumed run writes the same table."""
    cache_dir = store.root.parent
    code = code_version(__file__, Path(__file__).with_name("registry.py"))

    def captures(model: ModelRef) -> list[str]:
        job = functional_jobs(windows, model.n_blocks, top_k)[0]
        return [job.key(request, model.digest, precision).digest for request in job.requests]

    pairs = list(combinations(models, 2))
    paths = {(a.name, b.name): cache_dir / "functional_similarity" /
             f"{cache_key('functional_similarity', code, captures(a), captures(b), top_k)}.parquet" for a, b in pairs}
    frames = {pair: read_cached(path, pl.read_parquet) for pair, path in paths.items()}
    missing = [(a, b) for a, b in pairs if frames[(a.name, b.name)] is None]
    started = time.perf_counter()
    if missing:
        rows = functional_features(models, windows, store, precision, top_k, pairs=missing)
        for a, b in missing:
            names = [a.name, b.name]
            frame = rows.filter(pl.col("model_a").is_in(names) & pl.col("model_b").is_in(names))
            write_parquet(frame, paths[(a.name, b.name)])
            frames[(a.name, b.name)] = frame
    share = (time.perf_counter() - started) / max(1, len(missing))  # the missing pairs' seconds, split evenly
    for a, b in pairs:
        hit = (a, b) not in missing
        record(cache_dir, "functional_similarity", f"{a.name}|{b.name}", hit, 0.0 if hit else share)
    return pl.concat(list(frames.values()))
