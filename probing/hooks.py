"""Hook points by transformer-lens name, on a loaded HF model: an HF module map where the model has the usual
decoder layout, the transformer-lens bridge otherwise.

Names (what every capture request uses): `hook_embed` (token embeddings), `blocks.{i}.hook_resid_post` (the
residual stream after block i, before the final norm), `blocks.{i}.attn.hook_pattern` ([batch, head, query, key]
attention probabilities) and `hook_unembed` (the final logits). TransformerBridge provides them on every
architecture it can boot (and forces eager attention, so patterns exist); for the others the same names map onto
HF modules by forward hooks (embedding, decoder layer, its self-attention's weights output, the output head),
with eager attention switched on while the hooks are registered, so both backends see the same computation. `auto` prefers the module map: it
was never slower than the bridge in the capture bench, and in one run the bridge took 1.66x a plain forward pass
against the module map's 0.86x (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

EMBED_HOOK = "hook_embed"
RESID_HOOK = "blocks.{}.hook_resid_post"
PATTERN_HOOK = "blocks.{}.attn.hook_pattern"
LOGITS_HOOK = "hook_unembed"
BACKENDS = ("auto", "transformer-lens", "torch-hooks")

Hook = Callable[[torch.Tensor], None]


class HookError(ValueError):
    """A hook name the model has no point for."""


def layer_hooks(n_blocks: int) -> list[str]:
    """The probing layers: 0 = embeddings, i = residual after block i-1 (n_blocks + 1 names)."""
    return [EMBED_HOOK] + [RESID_HOOK.format(i) for i in range(n_blocks)]


def pattern_hooks(n_blocks: int) -> list[str]:
    return [PATTERN_HOOK.format(i) for i in range(n_blocks)]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _second(out):
    return out[1]


class HookRunner:
    """Runs a loaded model with callbacks on named hook points; `backend` auto = torch hooks on the HF module map
    where the model has one (`decoder.layers[i].self_attn`), the transformer-lens bridge otherwise."""

    def __init__(self, model, tokenizer, backend: str = "auto"):
        if backend not in BACKENDS:
            raise HookError(f"unknown hook backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.model, self.tokenizer = model, tokenizer
        bridge = backend == "transformer-lens" or (backend == "auto" and not self._has_module_map(model))
        self.bridge = self._boot_bridge(model, tokenizer) if bridge else None
        if backend == "transformer-lens" and self.bridge is None:
            raise HookError(f"transformer-lens cannot boot {model.config.model_type!r}")
        self.n_blocks = model.config.num_hidden_layers
        self.device = next(model.parameters()).device

    @staticmethod
    def _has_module_map(model) -> bool:
        layers = getattr(model.base_model, "layers", None)
        return bool(layers) and all(hasattr(layer, "self_attn") for layer in layers)

    @staticmethod
    def _boot_bridge(model, tokenizer):
        try:
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_transformers(model.name_or_path, hf_model=model, tokenizer=tokenizer)
        except Exception:  # noqa: BLE001 - any architecture the bridge cannot map: use the HF module map
            return None

    @property
    def backend(self) -> str:
        return "transformer-lens" if self.bridge is not None else "torch-hooks"

    def _hf_point(self, name: str):
        """(module, picks the hooked value from the module's output) for a transformer-lens name."""
        decoder = self.model.base_model
        if name == EMBED_HOOK:
            return decoder.get_input_embeddings(), _first
        if name == LOGITS_HOOK:
            return self.model.get_output_embeddings(), _first
        match = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_post|attn\.hook_pattern)", name)
        if match and int(match[1]) < self.n_blocks:
            layer = decoder.layers[int(match[1])]
            return (layer, _first) if match[2] == "hook_resid_post" else (layer.self_attn, _second)
        raise HookError(f"hook {name!r}: not a hook point of this {self.model.config.model_type} model "
                        f"({self.n_blocks} blocks; torch-hooks knows {EMBED_HOOK}, {RESID_HOOK}, {PATTERN_HOOK}, "
                        f"{LOGITS_HOOK})")

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hooks: dict[str, Hook]) -> None:
        """One forward pass calling hooks[name](activation) at each named point."""
        with self.hooked(hooks) as forward:
            forward(input_ids, attention_mask)

    @contextmanager
    def hooked(self, hooks: dict[str, Hook]) -> Iterator[Callable[[torch.Tensor, torch.Tensor], None]]:
        """Hooks registered once for many forward passes (a capture registers them once, not once per batch):
        yields forward(input_ids, attention_mask), which calls hooks[name](activation) at each named point."""
        if self.bridge is not None:
            unknown = [name for name in hooks if name not in self.bridge.hook_dict]
            if unknown:
                raise HookError(f"hook {unknown[0]!r}: not a hook point of the transformer-lens bridge")
            with self.bridge.hooks(fwd_hooks=[(name, lambda act, hook, f=f: f(act)) for name, f in hooks.items()]):
                yield lambda ids, mask: self.bridge(ids, attention_mask=mask, return_type=None)
            return
        points = {name: self._hf_point(name) for name in hooks}
        handles = [module.register_forward_hook(lambda mod, args, out, f=hooks[name], pick=pick: f(pick(out)))
                   for name, (module, pick) in points.items()]
        # The output head runs only when its logits are asked for (vocab × hidden per token is not free).
        model = self.model if LOGITS_HOOK in hooks else self.model.base_model
        # Attention weights exist only in eager attention; the model gets its own implementation back afterwards,
        # so whatever runs next on it (lm-eval's scoring) sees it as loaded.
        attention = self.model.config._attn_implementation
        if attention != "eager":
            self.model.set_attn_implementation("eager")
        try:
            yield lambda ids, mask: model(input_ids=ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
            if attention != "eager":
                self.model.set_attn_implementation(attention)
