"""One forward pass per batch -> pooled representations of every layer, reduced inside the hooks.

Layers (what "layer L" means everywhere in merge-eval): layer 0 = the token embeddings (`hook_embed`, HF
`hidden_states[0]`); layer i in 1..L = the residual stream after block i-1 (`blocks.{i-1}.hook_resid_post`), i.e.
BEFORE the final norm. HF's `hidden_states[i]` equals ours for i < L, but HF's last entry is taken after the final
norm; we keep the pre-norm residual so all L+1 layers live in the same residual basis (a SmolLM2 model gives 31).

Each hook turns its [batch, seq, d] activation into [batch, requests, d] with one einsum against a pooling-weight
tensor (masked sentence mean, last token, or the mean over the tokens covering a character span, found with the
fast tokenizer's offset mapping), so no full-sequence activation outlives its own layer of its own batch.
Capture goes through transformer-lens's TransformerBridge so hook points carry the field's names; architectures the
bridge cannot boot fall back to plain torch forward hooks on the HF embedding and decoder-layer modules.
Right padding + a causal model means real tokens never see padding, so batching does not change any value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from tqdm.auto import tqdm

from probing.holmes import ProbingTask, Span
from reports.errors import UserError
from reports.tables import atomic_path

CAPTURE_VERSION = "1"
EMBED_HOOK = "hook_embed"
RESID_HOOK = "blocks.{}.hook_resid_post"
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


class LayerRunner:
    """Runs a model with one callback per layer (0 = embeddings, i = residual after block i-1)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.bridge = self._boot_bridge(model, tokenizer)
        self.n_layers = model.config.num_hidden_layers + 1
        self.hidden_size = model.config.hidden_size

    @staticmethod
    def _boot_bridge(model, tokenizer):
        try:
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_transformers(model.name_or_path, hf_model=model, tokenizer=tokenizer)
        except Exception:  # noqa: BLE001 - any architecture the bridge cannot map: use plain torch hooks
            return None

    @property
    def backend(self) -> str:
        return "transformer-lens" if self.bridge is not None else "torch-hooks"

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            on_layer: Callable[[int, torch.Tensor], None]) -> None:
        if self.bridge is not None:
            names = [EMBED_HOOK] + [RESID_HOOK.format(i) for i in range(self.n_layers - 1)]
            hooks = [(name, lambda act, hook, layer=layer: on_layer(layer, act)) for layer, name in enumerate(names)]
            self.bridge.run_with_hooks(input_ids, attention_mask=attention_mask, return_type=None, fwd_hooks=hooks)
            return
        decoder = self.model.base_model
        modules = [decoder.get_input_embeddings(), *decoder.layers]
        handles = [m.register_forward_hook(lambda mod, args, out, layer=layer: on_layer(
            layer, out[0] if isinstance(out, tuple) else out)) for layer, m in enumerate(modules)]
        try:
            decoder(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            for handle in handles:
                handle.remove()


def capture(runner: LayerRunner, requests: Sequence[Request], batch_size: int = 32, max_length: int = 128,
            progress: str | None = None) -> torch.Tensor:
    """[n_layers, len(requests), d] float32 pooled representations; each text is encoded once."""
    tokenizer = runner.tokenizer
    texts = sorted({r.text for r in requests})
    by_text: dict[str, list[int]] = {t: [] for t in texts}
    for i, request in enumerate(requests):
        by_text[request.text].append(i)
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    device = next(runner.model.parameters()).device
    out = torch.zeros(runner.n_layers, len(requests), runner.hidden_size)
    pad = tokenizer.pad_token_id
    for begin in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False):
        batch = order[begin:begin + batch_size]
        seq = max(len(encoded["input_ids"][t]) for t in batch)
        width = max(len(by_text[texts[t]]) for t in batch)
        ids = torch.full((len(batch), seq), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), seq), dtype=torch.long)
        weights = torch.zeros((len(batch), width, seq))
        target = torch.full((len(batch), width), -1, dtype=torch.long)
        for row, t in enumerate(batch):
            n = len(encoded["input_ids"][t])
            ids[row, :n] = torch.tensor(encoded["input_ids"][t])
            mask[row, :n] = 1
            members = by_text[texts[t]]
            w = _pooling_weights([requests[i] for i in members], np.array(encoded["offset_mapping"][t]),
                                 np.array(encoded["special_tokens_mask"][t], dtype=bool))
            weights[row, :len(members), :n] = torch.from_numpy(w)
            target[row, :len(members)] = torch.tensor(members)
        keep = target >= 0
        weights_device = weights.to(device)

        def pool(layer: int, act: torch.Tensor) -> None:
            pooled = torch.einsum("brs,bsd->brd", weights_device, act.float())
            out[layer, target[keep]] = pooled[keep.to(device)].cpu()

        with torch.inference_mode():
            runner.run(ids.to(device), mask.to(device), pool)
    return out


def task_features(pooled: torch.Tensor, item_index: np.ndarray) -> torch.Tensor:
    """[n_layers, n_items, k*d]: each item's requests concatenated (BI pairs, token pairs)."""
    layers, _, d = pooled.shape
    return pooled[:, torch.from_numpy(item_index).reshape(-1)].reshape(layers, len(item_index), -1)


def capture_key(model_digest: str, task: ProbingTask, pooling: str, max_length: int, precision: str) -> str:
    parts = [CAPTURE_VERSION, model_digest, task.digest, pooling, str(max_length), precision]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached_capture(cache_dir: Path, key: str, compute: Callable[[], torch.Tensor],
                   metadata: dict[str, str]) -> torch.Tensor:
    """Load `cache_dir/<key>.safetensors` (fp16) or compute, store atomically, and return it (as float32)."""
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        return safetensors.torch.load_file(path)["pooled"].float()
    pooled = compute()
    with atomic_path(path) as temp:
        safetensors.torch.save_file({"pooled": pooled.half().contiguous()}, temp,
                                    metadata={k: json.dumps(v) for k, v in metadata.items()})
    return pooled.half().float()
