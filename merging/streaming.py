"""Tensor-by-tensor reading of safetensors checkpoints, so memory follows one chunk of one tensor, not a model.

`safe_open` memory-maps a file and hands out views: every page a read touches stays resident (and counted in
RSS) until the map closes. Keeping handles open for a whole pass therefore "loads" the model after all, so a
`StreamedCheckpoint` reopens its files once it has touched `remap_bytes` of them.
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from merging.checkpoints import CheckpointError

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
# Module type from a tensor name, first match wins (norm before attention: `self_attn.q_norm` is a norm).
_MODULES = (("embeddings", ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out")),
            ("norms", ("norm", "ln_")), ("attention", ("attn", "attention")), ("mlp", ("mlp", "feed_forward")))


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor (`model.layers.12.mlp...` -> 12); None outside the layer stack."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    """attention | mlp | embeddings | norms | other, from the tensor name."""
    for module, markers in _MODULES:
        if any(marker in name for marker in markers):
            return module
    return "other"


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors weights (weight features and preflight stream safetensors)")
    return files


class StreamedCheckpoint:
    """Names, shapes and dtypes from the safetensors headers; row ranges of tensors read on demand."""

    def __init__(self, folder: Path, remap_bytes: int = 64 << 20):
        self.folder = Path(folder)
        self.remap_bytes = remap_bytes
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._file_of: dict[str, Path] = {}
        for path in safetensors_files(self.folder):
            with safe_open(path, framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.shapes[name], self.dtypes[name] = tuple(view.get_shape()), view.get_dtype()
                    self._file_of[name] = path
        self._handles: dict[Path, object] = {}
        self._stack = ExitStack()
        self._touched = 0

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path]

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` along its first axis (a 0-d tensor reads as one row)."""
        handle = self._handle(self._file_of[name])
        tensor = handle.get_tensor(name).reshape(1) if not self.shapes[name] else handle.get_slice(name)[start:stop]
        self._touched += tensor.numel() * tensor.element_size()
        return tensor

    def release(self) -> None:
        """Unmap the files once enough of them has been touched; the next read reopens them."""
        if self._touched >= self.remap_bytes:
            self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()
        self._touched = 0

    def __enter__(self) -> StreamedCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def row_chunks(shape: tuple[int, ...], max_elements: int) -> Iterator[tuple[int, int]]:
    """Row ranges covering a tensor, each at most `max_elements` (at least one row)."""
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, max_elements // per_row)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def stream_chunks(checkpoints: list[StreamedCheckpoint], names: list[str],
                  max_elements: int) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """For each tensor and row chunk: (name, the chunk of every checkpoint, in its stored dtype).

    The chunks are views into the memory maps: use them before asking for the next one, which may unmap them.
    """
    for name in names:
        for start, stop in row_chunks(checkpoints[0].shapes[name], max_elements):
            yield name, [checkpoint.read(name, start, stop) for checkpoint in checkpoints]
            for checkpoint in checkpoints:
                checkpoint.release()
