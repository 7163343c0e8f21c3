"""Model checkpoints: where a config's `source` lives on disk, what its content hash is, how to load it.

Every stage loads models through `load_model`, so precision, device, attention implementation and the safety
switches (`trust_remote_code`, pickle checkpoints) are decided in one place.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_PREFIX = "embedded:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DIGEST_PREFIX = ".merge-eval-digest"
_DIGEST_FILE = f"{_DIGEST_PREFIX}.v2.json"  # v2: sha256 over per-file digests


class CheckpointError(ValueError):
    """A model source that cannot be used (missing folder, pickle-only weights without opt-in)."""


@dataclass(frozen=True)
class LoadOptions:
    """How every stage loads a model: the config's one precision, its device, its safety switches."""

    precision: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files: safetensors, or pickle `.bin` files only when the config opts in."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(folder.glob("*.bin"))
    if pickles and not allow_pickle:
        raise CheckpointError(f"{folder}: only pickle (.bin) weights found; set allow_pickle: true to load them")
    if not pickles:
        raise CheckpointError(f"{folder}: no safetensors weights found")
    return pickles


def resolve_source(source: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder for a config `source`: the embedded family, a folder, or a hub repo id (downloaded)."""
    if source.startswith(EMBEDDED_PREFIX):
        from merging.family import build_family

        member = source.removeprefix(EMBEDDED_PREFIX)
        return build_family((member,))[member]
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: a model source must be a folder, not a file")
        weight_files(path, allow_pickle)
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"] + (["*.bin"] if allow_pickle else [])
    return Path(snapshot_download(source, revision=revision, allow_patterns=patterns))


def file_digest(path: Path) -> str:
    """sha256 of one file, read in 4 MiB blocks (checkpoints are far larger than what we want in memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(folder: Path) -> str:
    """sha256 over the checkpoint's weight and config files, memoised beside them by (size, mtime)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in {".safetensors", ".bin", ".json"}
                   and not p.name.startswith(_DIGEST_PREFIX))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo = folder / _DIGEST_FILE
    try:
        cached = json.loads(memo.read_text())
        if cached["stamp"] == stamp:
            return cached["digest"]
    except (OSError, ValueError, KeyError):
        pass
    value = hashlib.sha256("".join(f"{p.name}:{file_digest(p)}\n" for p in files).encode()).hexdigest()
    try:
        memo.write_text(json.dumps({"stamp": stamp, "digest": value}))
    except OSError:  # read-only model folder: recompute next time
        pass
    return value


def load_model(folder: Path, options: LoadOptions, attn_implementation: str | None = None):
    """(model, tokenizer) in the config's precision on its device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weight_files(Path(folder), options.allow_pickle)
    kwargs = {"dtype": options.dtype, "trust_remote_code": options.trust_remote_code,
              "use_safetensors": None if options.allow_pickle else True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(options.torch_device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
