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
from runstore.atomic import read_cached
from runstore.cache import cache_key, code_version, record
from runstore.tables import write_parquet

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
    return x, torch.linalg.matrix_norm((x.T @ x).double())  # a float32 norm of d² terms is off by ~2e-5


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
    return top["logprobs"].flatten(0, -2), top["indices"].flatten(0, -2).long(), top["log_rest"].flatten()


KL_CHUNK = 256  # tokens per dense [tokens, vocab] float64 table: 100 MB at SmolLM2's 49,152 tokens


class _LogQ:
    """log q_b for every vocabulary id of b's tokens (module docstring): the spread of b's remaining mass
    everywhere, plus at b's top ids their excess over it. The excess goes into a dense [tokens, vocab] table of
    zeros, one chunk of tokens at a time, read by a gather for every a compared with b, then zeroed again at
    the same ids; a binary search of b's ids per pair cost ~0.5 s per ordered pair on the similarity set."""

    def __init__(self, top: tuple[torch.Tensor, torch.Tensor, torch.Tensor], vocab_size: int):
        self.logp, self.ids, rest = top
        # floored as `_kl` floors log q: a rest of -inf (k covers the vocabulary) leaves the excess finite
        self.spread = (rest.double() - np.log(max(vocab_size - self.ids.shape[-1], 1))).clamp(min=LOG_FLOOR)

    def fill(self, table: torch.Tensor, tokens: slice) -> torch.Tensor:
        excess = self.logp[tokens].double() - self.spread[tokens, None]
        return table[:len(excess)].scatter_(-1, self.ids[tokens], excess)

    def clear(self, table: torch.Tensor, tokens: slice) -> None:
        table[:len(self.ids[tokens])].scatter_(-1, self.ids[tokens], 0.0)


def _kl(logp_a: torch.Tensor, rest_a: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-token KL over a's top k + a's rest bucket, from log q_b at a's top ids ([n, k] float64)."""
    log_q = log_q.clamp(min=LOG_FLOOR)
    q_rest = (1.0 - log_q.exp().sum(-1)).clamp(min=1e-30)
    r_a = rest_a.exp()
    return (logp_a.exp() * (logp_a - log_q)).sum(-1) + torch.xlogy(r_a, r_a) - torch.xlogy(r_a, q_rest)


def _ordered_kl(top: dict[str, tuple], pairs: list[tuple[str, str]], vocab: dict[str, int]
                ) -> dict[tuple[str, str], torch.Tensor]:
    """Per-token KL(a ‖ b) of every ordered pair, each chunk of b's table filled once for all its a's."""
    sides = {b: _LogQ(top[b], vocab[b]) for b in dict.fromkeys(b for _, b in pairs)}
    n = len(next(iter(top.values()))[0])
    table = torch.zeros(min(KL_CHUNK, n), max(vocab.values()), dtype=torch.float64)
    parts: dict[tuple[str, str], list[torch.Tensor]] = {pair: [] for pair in pairs}
    for begin in range(0, n, KL_CHUNK):
        tokens = slice(begin, begin + KL_CHUNK)
        for b, side in sides.items():
            excess = side.fill(table, tokens)
            for a in [a for a, b_ in pairs if b_ == b]:
                logp_a, ids_a, rest_a = (t[tokens] for t in top[a])
                log_q = side.spread[tokens, None] + excess.gather(-1, ids_a)
                parts[(a, b)].append(_kl(logp_a.double(), rest_a.double(), log_q))
            side.clear(table, tokens)
    return {pair: torch.cat(chunks) for pair, chunks in parts.items()}


def topk_kl(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Per-token KL(p_a ‖ p_b) in nats from two TopK captures; see the module docstring."""
    return _ordered_kl({"a": _tokens_first(a), "b": _tokens_first(b)}, [("a", "b")],
                       {"b": vocab_size})[("a", "b")]


def _hubs(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Each unordered pair filed under one of its two models, the one in more pairs (ties: the lower index), so
    that one product per hub covers all its pairs: every pair of M models gives hubs 0..M-2, each with all
    later models (a contiguous block of columns); one model added to a finished run gives one hub."""
    degree = np.bincount(np.array(pairs).reshape(-1))
    hubs: dict[int, list[int]] = {}
    for a, b in pairs:
        hub, other = (a, b) if (degree[a], -a) >= (degree[b], -b) else (b, a)
        hubs.setdefault(hub, []).append(other)
    return {hub: sorted(others) for hub, others in hubs.items()}


def _members(stacked: torch.Tensor, models: list[int], dim: int) -> torch.Tensor:
    """The entries of `models` along `dim` of a stack of models: a view where they are contiguous."""
    if models == list(range(models[0], models[-1] + 1)):
        return stacked.narrow(dim, models[0], len(models))
    return stacked.index_select(dim, torch.tensor(models))


def _cross_cka(states: list[torch.Tensor], hubs: dict[int, list[int]]) -> dict[tuple[int, int], float]:
    """Linear CKA of every hub with each of its partners: the models' centred float32 features side by side,
    then one product per hub, Xᵀ[Y₁ … Y_k] (the FLOPs of a product per pair, in a wider shape). float32
    products: the d×d cross products dominate the stage's time; CKA's relative error stays ~1e-6."""
    stacked = torch.stack(states, dim=1)  # [n, M, d]
    stacked -= stacked.mean(0)  # centred in place: the `cka_side` of every model, without a copy per model
    norms = [torch.linalg.matrix_norm((x.T @ x).double()) for x in stacked.unbind(1)]
    out = {}
    for hub, others in hubs.items():
        cross = stacked[:, hub].T @ _members(stacked, others, 1).flatten(1)  # [d, k·d]
        # summed in float64: a float32 norm over the strided [d, k, d] blocks lost 7e-4 of CKA on real captures
        squares = cross.unflatten(1, (len(others), -1)).double().square().sum((0, 2))
        out.update({(hub, other): (squares[i] / (norms[hub] * norms[other])).item()
                    for i, other in enumerate(others)})
    return out


def _cross_activation_cosine(states: list[torch.Tensor], hubs: dict[int, list[int]]
                             ) -> dict[tuple[int, int], float]:
    """Mean token cosine of every hub with each partner: per pair one rowwise dot product in float32 (stored
    bfloat16 values multiply exactly in float32; torch's sum, unlike a BLAS dot, keeps the error ~1e-9), over
    each model's row norms taken once in float64; both sides in float64 per pair cost more than the rest of the
    stage."""
    norms = [x.double().norm(dim=-1) for x in states]
    return {(hub, other): ((states[hub] * states[other]).sum(-1).double()
                           / (norms[hub] * norms[other]).clamp(min=1e-8)).mean().item()
            for hub, others in hubs.items() for other in others}


def _cross_pattern_cosine(patterns: list[torch.Tensor], hubs: dict[int, list[int]]
                          ) -> dict[tuple[int, int], list[float]]:
    """Per-head cosine of every hub's flattened attention patterns with each partner's ([windows, heads, packed]
    per model): products of the bfloat16 probabilities are exact in float32, summed per window in float32 and
    over windows in float64; each model's norms taken once."""
    rows = [p.float() for p in patterns]
    norms = [r.square().sum(-1).double().sum(0).sqrt() for r in rows]
    return {(hub, other): ((rows[hub] * rows[other]).sum(-1).double().sum(0)
                           / (norms[hub] * norms[other]).clamp(min=1e-8)).tolist()
            for hub, others in hubs.items() for other in others}


def _layer(store: CaptureStore, job: CaptureJob, request: HookRequest, model: ModelRef, precision: str):
    return store.load(job.key(request, model.digest, precision))


def functional_features(models: list[ModelRef], windows: TokenWindows, store: CaptureStore, precision: str,
                        top_k: int = TOP_K, pairs: list[tuple[ModelRef, ModelRef]] | None = None) -> pl.DataFrame:
    """similarity.parquet rows (source functional) for every pair of `models` (KL: both orders of each pair), or
    for `pairs` of them only (each model's captures are still read once per layer). Each feature is computed for
    all pairs of a layer at once (`_hubs`); values equal the per-pair functions above.

    Layer numbering as in probing: `activation_cosine`/`cka` layer 0 = embeddings, i = after block i-1;
    `attention_cosine` rows of block i carry layer i + 1 (the residual layer that block writes) and `head`.
    """
    pairs = list(combinations(models, 2)) if pairs is None else pairs
    models = [m for m in models if any(m in pair for pair in pairs)]
    jobs = {m.name: functional_jobs(windows, m.n_blocks, top_k)[0] for m in models}
    if len({m.n_blocks for m in models}) > 1:
        raise ValueError(f"functional similarity needs models of one depth; got {[m.n_blocks for m in models]}")
    position = {m.name: i for i, m in enumerate(models)}
    hubs = _hubs([(position[a.name], position[b.name]) for a, b in pairs])

    def value(per_pair: dict[tuple[int, int], object], a: ModelRef, b: ModelRef):
        i, j = position[a.name], position[b.name]
        return per_pair[(i, j)] if (i, j) in per_pair else per_pair[(j, i)]

    rows: list[dict] = []
    per_pair: dict[tuple[str, str, str], list[float]] = {}
    n_tokens = windows.n_rows * windows.window

    def requests(kind):
        return [r for r in jobs[models[0].name].requests if isinstance(r.reducer, kind)]

    for layer, request in enumerate(requests(Tokens)):
        states = [_layer(store, jobs[m.name], request, m, precision)["value"].float().flatten(0, 1) for m in models]
        features = {"activation_cosine": _cross_activation_cosine(states, hubs), "cka": _cross_cka(states, hubs)}
        for a, b in pairs:
            for feature, values in features.items():
                per_pair.setdefault((a.name, b.name, feature), []).append(value(values, a, b))
                rows.append({"model_a": a.name, "model_b": b.name, "feature": feature, "scope": "layer",
                             "layer": layer, "value": value(values, a, b), "n": n_tokens})
    for block, request in enumerate(requests(PackedPattern)):
        cosines = _cross_pattern_cosine([_layer(store, jobs[m.name], request, m, precision)["value"]
                                         for m in models], hubs)
        for a, b in pairs:
            values = value(cosines, a, b)
            per_pair.setdefault((a.name, b.name, "attention_cosine"), []).extend(values)
            rows += [{"model_a": a.name, "model_b": b.name, "feature": "attention_cosine", "scope": "head",
                      "layer": block + 1, "head": head, "value": v, "n": n_tokens} for head, v in enumerate(values)]
    (logits,) = requests(TopK)
    top = {m.name: _tokens_first(_layer(store, jobs[m.name], logits, m, precision)) for m in models}
    ordered = [(a.name, b.name) for pair in pairs for a, b in (pair, pair[::-1])]
    kl = _ordered_kl(top, ordered, {m.name: m.vocab_size for m in models})
    for a, b in ordered:
        per_pair[(a, b, "kl")] = kl[(a, b)].tolist()
    for (a, b, feature), values in per_pair.items():
        rows += summary_rows(values, model_a=a, model_b=b, feature=feature)
    return conform(pl.DataFrame(rows, infer_schema_length=None).with_columns(source=pl.lit("functional")))


_ROLES = ("\x00a", "\x00b")  # a cached pair's model columns: its key is content, so names are the caller's


def _named(frame: pl.DataFrame | None, a: str, b: str, to_roles: bool = False) -> pl.DataFrame | None:
    """A pair's rows with its models' names swapped for roles (to cache) or back (from the cache): models of
    identical content (a slerp that degenerates to linear, a copied folder) share entries under other names."""
    if frame is None:
        return None
    mapping = dict(zip((a, b), _ROLES)) if to_roles else dict(zip(_ROLES, (a, b)))
    return frame.with_columns(pl.col(c).replace(mapping) for c in ("model_a", "model_b"))


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
    frames = {(a.name, b.name): _named(read_cached(paths[(a.name, b.name)], pl.read_parquet), a.name, b.name)
              for a, b in pairs}
    missing = [(a, b) for a, b in pairs if frames[(a.name, b.name)] is None]
    started = time.perf_counter()
    if missing:
        rows = functional_features(models, windows, store, precision, top_k, pairs=missing)
        stored: dict[Path, pl.DataFrame] = {}  # pairs of identical content share one entry: the first one computed
        for a, b in missing:
            names = [a.name, b.name]
            frame = rows.filter(pl.col("model_a").is_in(names) & pl.col("model_b").is_in(names))
            path = paths[(a.name, b.name)]
            if path not in stored:
                stored[path] = _named(frame, *names, to_roles=True)
                write_parquet(stored[path], path)
            frames[(a.name, b.name)] = _named(stored[path], *names)
    share = (time.perf_counter() - started) / max(1, len(missing))  # the missing pairs' seconds, split evenly
    for a, b in pairs:
        hit = (a, b) not in missing
        record(cache_dir, "functional_similarity", f"{a.name}|{b.name}", hit, 0.0 if hit else share)
    return pl.concat(list(frames.values()))
