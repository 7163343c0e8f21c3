"""Capture: one forward pass per batch, each requested hook's activation reduced inside its hook.

A request names a hook point (transformer-lens names, `probing.hooks`) and a reducer: `Pool` (the probe inputs'
masked mean / last token / span mean, found with the fast tokenizer's offset mapping), `Tokens` (every token),
`PackedPattern` (attention probabilities, causal triangle only) or `TopK` (next-token log-probs reduced to the k
most likely tokens + the remaining mass). Reducing inside the hook means no full activation outlives its own
layer of its own batch. Outputs are kept in their storage dtype, float32 or bfloat16 only: float16 overflows at
65,504 and 7B models have outlier dimensions in the thousands (`STORE_DTYPES`). `probing.store` keeps them.

Layers (what "layer L" means everywhere in merge-eval): layer 0 = the token embeddings (`hook_embed`, HF
`hidden_states[0]`); layer i in 1..L = the residual stream after block i-1 (`blocks.{i-1}.hook_resid_post`), i.e.
BEFORE the final norm. HF's `hidden_states[i]` equals ours for i < L, but HF's last entry is taken after the final
norm; we keep the pre-norm residual so all L+1 layers live in the same residual basis (a SmolLM2 model gives 31).
Right padding + a causal model means real tokens never see padding, so batching does not change any value.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from probing.holmes import ProbingTask, Span
from probing.hooks import HookRunner, layer_hooks
from runstore.cache import cache_key
from runstore.errors import UserError

PAIR_JOIN = " "  # _CROSS pair types: decoder-only models have no separator token, so sides are joined by a space


class CaptureError(UserError):
    """Inputs that cannot be captured (a span no token covers, e.g. cut off by max_length)."""


@dataclass(frozen=True)
class Request:
    """One pooled vector to capture: `kind` mean|last over `text`, or span over characters [start, end)."""

    text: str
    kind: str
    start: int = 0
    end: int = 0


def _cross(contexts: tuple[str, ...]) -> tuple[str, list[int]]:
    offsets = np.cumsum([0] + [len(c) + len(PAIR_JOIN) for c in contexts[:-1]]).tolist()
    return PAIR_JOIN.join(contexts), offsets


def item_requests(task: ProbingTask, item: int, pooling: str) -> list[Request]:
    """The requests whose concatenation represents one item (Holmes _BI: each side alone; _CROSS: joined)."""
    inputs, contexts = task.inputs[item], task.contexts[item]
    cross = task.task_type.endswith("_CROSS")
    if isinstance(inputs[0], Span):
        if cross:
            text, offsets = _cross(contexts)
            return [Request(text, "span", offsets[s.context_index] + s.start, offsets[s.context_index] + s.end)
                    for s in inputs]
        return [Request(contexts[s.context_index], "span", s.start, s.end) for s in inputs]
    if cross:
        return [Request(_cross(tuple(inputs))[0], pooling)]
    return [Request(text, pooling) for text in inputs]


def task_requests(task: ProbingTask, pooling: str = "mean") -> tuple[list[Request], np.ndarray]:
    """Distinct requests of a task and, per item, the indices of the requests to concatenate ([n_items, k])."""
    index: dict[Request, int] = {}
    rows = []
    for item in range(len(task.inputs)):
        rows.append([index.setdefault(r, len(index)) for r in item_requests(task, item, pooling)])
    if len({len(r) for r in rows}) != 1:
        raise CaptureError(f"task {task.name}: items have different numbers of inputs; cannot stack features")
    return list(index), np.array(rows, dtype=np.int64)


def _pooling_weights(requests: Sequence[Request], offsets: np.ndarray, special: np.ndarray) -> np.ndarray:
    """[len(requests), seq] weights for one text; rows sum to 1."""
    valid = ~special & (offsets[:, 1] > offsets[:, 0])
    weights = np.zeros((len(requests), len(offsets)), dtype=np.float32)
    for row, request in enumerate(requests):
        if request.kind == "mean":
            mask = valid
        elif request.kind == "last":
            mask = np.zeros_like(valid)
            mask[np.flatnonzero(valid)[-1:]] = True
        else:
            mask = valid & (offsets[:, 0] < request.end) & (offsets[:, 1] > request.start)
        if not mask.any():
            raise CaptureError(f"no token covers {request.kind} [{request.start}, {request.end}) of "
                               f"{request.text!r} (cut off by max_length?)")
        weights[row] = mask / mask.sum()
    return weights


DEFAULT_BATCH_TOKENS = 1024  # tokens per forward pass, padding included (docs/PERFORMANCE.md: how it was chosen)


def token_batches(sorted_lengths: np.ndarray, batch_tokens: int, items: np.ndarray) -> Iterator[np.ndarray]:
    """Consecutive runs of `items` (sorted by ascending length) whose padded size, count × longest, stays within
    `batch_tokens`; an item longer than the budget goes alone."""
    begin = 0
    while begin < len(items):
        end = begin + 1
        while end < len(items) and (end - begin + 1) * sorted_lengths[end] <= batch_tokens:
            end += 1
        yield items[begin:end]
        begin = end


@dataclass
class Batch:
    """One forward pass: right-padded ids, and where each item's reduced rows go (`rows` [B, R], -1 = none)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor | None = None  # [B, R, S] pooling weights (Pool), None for full token windows
    complete: torch.Tensor | None = None  # [B] whether each row holds its whole scored text (TextLogLik)


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval conditions an empty context on (its `prefix_token_id`: BOS, else EOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode_scored(tokenizer, texts: list[str], max_length: int) -> dict[str, list]:
    """Texts encoded as lm-eval scores a continuation after an empty context: the prefix token, then the text's
    tokens without special tokens (a text that already starts with the prefix token keeps it as its context).
    The prefix is a special token with an empty offset, so pooling never includes it. A text longer than
    `max_length` is cut and flagged in `complete`, so its log-likelihood is not taken for lm-eval's."""
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    prefix = prefix_token_id(tokenizer)
    out: dict[str, list] = {"input_ids": [], "offset_mapping": [], "special_tokens_mask": [], "complete": []}
    for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"]):
        offsets = [tuple(o) for o in offsets]
        special = [0] * len(ids)
        if not ids or ids[0] != prefix:
            ids, offsets, special = [prefix, *ids], [(0, 0), *offsets], [1, *special]
        else:
            special[0] = 1
        out["complete"].append(len(ids) <= max_length)
        out["input_ids"].append(ids[:max_length])
        out["offset_mapping"].append(offsets[:max_length])
        out["special_tokens_mask"].append(special[:max_length])
    return out


class PooledInputs:
    """Probe inputs: distinct texts, each encoded once, with pooling weights for the requests over it.

    `scored`: the texts are also scored as wholes by lm-eval's log-likelihood (minimal pairs), so they are encoded
    the way lm-eval encodes them (`_encode_scored`); the same forward pass then serves the probes and, through a
    `TextLogLik` request, the behaviour scores."""

    def __init__(self, requests: Sequence[Request], max_length: int, digest: str, name: str = "requests",
                 scored: bool = False):
        self.requests, self.max_length, self.name, self.scored = list(requests), max_length, name, scored
        self.digest = cache_key(digest, "scored") if scored else digest
        self.n_rows = len(self.requests)

    def texts(self) -> list[str]:
        return sorted({r.text for r in self.requests})

    def batches(self, tokenizer, batch_tokens: int) -> Iterator[Batch]:
        requests = self.requests
        texts = self.texts()
        by_text: dict[str, list[int]] = {t: [] for t in texts}
        for i, request in enumerate(requests):
            by_text[request.text].append(i)
        if self.scored:
            encoded = _encode_scored(tokenizer, texts, self.max_length)
        else:
            encoded = tokenizer(texts, truncation=True, max_length=self.max_length, return_offsets_mapping=True,
                                return_special_tokens_mask=True)
            encoded["complete"] = [False] * len(texts)  # never scored as wholes
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        order = np.argsort(lengths, kind="stable")
        pad = tokenizer.pad_token_id
        for batch in token_batches(lengths[order], batch_tokens, order):
            seq = max(len(encoded["input_ids"][t]) for t in batch)
            width = max(len(by_text[texts[t]]) for t in batch)
            ids = torch.full((len(batch), seq), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), seq), dtype=torch.long)
            weights = torch.zeros((len(batch), width, seq))
            rows = torch.full((len(batch), width), -1, dtype=torch.long)
            for row, t in enumerate(batch):
                n = len(encoded["input_ids"][t])
                ids[row, :n] = torch.tensor(encoded["input_ids"][t])
                mask[row, :n] = 1
                members = by_text[texts[t]]
                w = _pooling_weights([requests[i] for i in members], np.array(encoded["offset_mapping"][t]),
                                     np.array(encoded["special_tokens_mask"][t], dtype=bool))
                weights[row, :len(members), :n] = torch.from_numpy(w)
                rows[row, :len(members)] = torch.tensor(members)
            complete = torch.tensor([encoded["complete"][t] for t in batch])
            yield Batch(ids, mask, rows, weights, complete)


PROBE_INPUTS_MEMO = 256  # tasks' inputs `probe_inputs` keeps in the process (the bundled suite has 16, BLiMP 67)
_probe_inputs: dict[tuple, tuple[PooledInputs, np.ndarray]] = {}


def probe_inputs(task: ProbingTask, pooling: str, max_length: int) -> tuple[PooledInputs, np.ndarray]:
    """A probing task's capture inputs and, per item, the rows to concatenate (see `task_requests`); neither is
    modified by its users, so both are shared.

    Memoised in the process by the task's digest (which names its content, as in its capture and probe keys) and
    the settings: a warm run asks for every task's inputs twice per model, and building the requests of a task's
    items was the cost (~2 ms a task). The memo is emptied when full."""
    key = (task.digest, task.name, task.scored, pooling, max_length)
    found = _probe_inputs.get(key)
    if found is None:
        if len(_probe_inputs) >= PROBE_INPUTS_MEMO:
            _probe_inputs.clear()
        requests, item_index = task_requests(task, pooling)
        digest = cache_key("probe-inputs", task.digest, pooling, PAIR_JOIN)
        found = _probe_inputs[key] = (
            PooledInputs(requests, max_length, digest, name=f"probe:{task.name}", scored=task.scored), item_index)
    return found


STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # fp16 overflows at 65,504: refused


def _store_dtype(name: str) -> torch.dtype:
    if name not in STORE_DTYPES:
        raise CaptureError(f"storage dtype {name!r} refused: use one of {', '.join(STORE_DTYPES)} "
                           "(float16 overflows at 65,504, below the outlier activations of large models)")
    return STORE_DTYPES[name]


@dataclass(frozen=True)
class Pool:
    """[rows, d]: each request's pooling-weighted mean of the activation (probe inputs)."""

    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"pool-{self.dtype}"

    def __call__(self, act: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return {"value": torch.einsum("brs,bs...->br...", batch.weights, act.float())}


def _whole(batch: Batch, reducer: str) -> None:
    if batch.weights is not None:
        raise CaptureError(f"reducer {reducer} needs full token windows, not pooled requests")


@dataclass(frozen=True)
class Tokens:
    """[windows, S, d]: every token's activation (full windows, no padding)."""

    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"tokens-{self.dtype}"

    def __call__(self, act: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        _whole(batch, self.name)
        return {"value": act[:, None]}


@dataclass(frozen=True)
class PackedPattern:
    """[windows, H, S(S+1)/2]: attention probabilities, lower triangle packed row by row (causal zeros dropped)."""

    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"pattern-tril-{self.dtype}"

    def __call__(self, act: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        _whole(batch, self.name)
        query, key = torch.tril_indices(act.shape[-2], act.shape[-1], device=act.device)
        return {"value": act[..., query, key][:, None]}


@dataclass(frozen=True)
class TopK:
    """Next-token distributions reduced to the k most likely tokens' log-probs + the log of the remaining mass:
    `logprobs` [windows, S, k] (float32), `indices` (int32), `log_rest` [windows, S] (-inf when k covers all)."""

    k: int = 256

    @property
    def name(self) -> str:
        return f"topk{self.k}-float32"

    @property
    def dtype(self) -> str:
        return "float32"

    def __call__(self, act: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        _whole(batch, self.name)
        logp = torch.log_softmax(act.float(), dim=-1)
        top = logp.topk(min(self.k, act.shape[-1]), dim=-1)
        # The rest's own logsumexp: 1 - Σ top rounds to 0 (or below) in float32 for a peaked distribution.
        rest = logp.scatter_(-1, top.indices, float("-inf")).logsumexp(dim=-1)
        return {"logprobs": top.values[:, None], "indices": top.indices.int()[:, None], "log_rest": rest[:, None]}


@dataclass(frozen=True)
class TextLogLik:
    """Per request row: its whole text's summed next-token log-probs after the first token, and whether every
    token is the greedy choice: [rows, 2] float32 (NaN where the text was cut by max_length). On inputs encoded as
    lm-eval encodes an empty-context continuation (`PooledInputs(scored=True)`) this is lm-eval's
    `loglikelihood` answer (tests/test_one_pass.py), computed in float32 whatever the model's precision."""

    @property
    def name(self) -> str:
        return "loglik-float32"

    @property
    def dtype(self) -> str:
        return "float32"

    def __call__(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.complete is None:
            raise CaptureError(f"reducer {self.name} needs scored texts, not token windows")
        ids, mask = batch.input_ids.to(logits.device), batch.attention_mask.to(logits.device)
        targets, scored = ids[:, 1:], mask[:, 1:].bool()
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        loglik = (logp.gather(-1, targets[..., None])[..., 0] * scored).sum(-1)
        greedy = ((logp.argmax(-1) == targets) | ~scored).all(-1)
        loglik = torch.where(batch.complete.to(logits.device), loglik, torch.nan)
        per_row = torch.stack([loglik, greedy.float()], dim=-1)  # [B, 2]: one text per batch row
        return {"value": per_row[:, None].expand(-1, batch.rows.shape[1], -1)}


Reducer = Pool | Tokens | PackedPattern | TopK | TextLogLik


@dataclass(frozen=True)
class HookRequest:
    """One hook point (transformer-lens name) and how to reduce its activation inside the hook."""

    hook: str
    reducer: Reducer


class InputSet(Protocol):
    name: str
    digest: str
    max_length: int
    n_rows: int

    def batches(self, tokenizer, batch_tokens: int) -> Iterator[Batch]: ...


def run_capture(runner: HookRunner, inputs: InputSet, requests: Sequence[HookRequest],
                batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: str | None = None
                ) -> dict[HookRequest, dict[str, torch.Tensor]]:
    """One forward pass per batch of ≈ `batch_tokens` tokens for all requests, hooks registered once; each reduced
    output lands on the CPU in its storage dtype. Batching changes no value (right padding, causal model)."""
    outputs: dict[HookRequest, dict[str, torch.Tensor]] = {r: {} for r in requests}
    by_hook: dict[str, list[HookRequest]] = {}
    for request in requests:
        _store_dtype(request.reducer.dtype)
        by_hook.setdefault(request.hook, []).append(request)
    current: dict = {}  # the batch in flight, read by the hooks

    def on_hook(act: torch.Tensor, hook_requests: list[HookRequest]) -> None:
        batch, keep, targets = current["batch"], current["keep"], current["targets"]
        for request in hook_requests:
            for name, value in request.reducer(act, batch).items():
                value = value[keep].cpu()
                buffer = outputs[request].get(name)
                if buffer is None:
                    dtype = _store_dtype(request.reducer.dtype) if value.is_floating_point() else value.dtype
                    buffer = outputs[request][name] = torch.zeros((inputs.n_rows, *value.shape[1:]), dtype=dtype)
                buffer[targets] = value.to(buffer.dtype)

    hooks = {hook: lambda act, rs=rs: on_hook(act, rs) for hook, rs in by_hook.items()}
    batches = inputs.batches(runner.tokenizer, batch_tokens)
    with torch.inference_mode(), runner.hooked(hooks) as forward:
        # a named bar shows on a terminal only (tqdm's disable=None), and clears itself when done
        for batch in tqdm(batches, desc=progress, disable=True if progress is None else None, leave=False):
            keep = batch.rows >= 0
            if batch.weights is not None:
                batch.weights = batch.weights.to(runner.device)
            current.update(batch=batch, keep=keep.to(runner.device), targets=batch.rows[keep])
            forward(batch.input_ids.to(runner.device), batch.attention_mask.to(runner.device))
    return outputs


def capture(runner: HookRunner, requests: Sequence[Request], batch_tokens: int = DEFAULT_BATCH_TOKENS,
            max_length: int = 128, progress: str | None = None) -> torch.Tensor:
    """[n_layers, len(requests), d] float32 pooled representations of every probing layer."""
    inputs = PooledInputs(requests, max_length, digest="")
    hook_requests = [HookRequest(hook, Pool()) for hook in layer_hooks(runner.n_blocks)]
    out = run_capture(runner, inputs, hook_requests, batch_tokens, progress)
    return torch.stack([out[r]["value"] for r in hook_requests])


def task_features(pooled: torch.Tensor, item_index: np.ndarray) -> torch.Tensor:
    """[n_layers, n_items, k*d]: each item's requests concatenated (BI pairs, token pairs)."""
    layers, _, d = pooled.shape
    return pooled[:, torch.from_numpy(item_index).reshape(-1)].reshape(layers, len(item_index), -1)
