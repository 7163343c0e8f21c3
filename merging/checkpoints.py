"""Model checkpoints: where a config's `source` lives on disk, what its content hash is, how to load it.

Every stage loads models through `load_model`, so precision, device, attention implementation and the safety
switches (`trust_remote_code`, pickle checkpoints) are decided in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from merging import hub
from runstore.atomic import atomic_write_text, read_cached
from runstore.cache import DIGEST_MEMOS, cache_key
from runstore.cache import content_digest as files_digest
from runstore.errors import UserError

EMBEDDED_PREFIX = "embedded:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DIGESTS: dict[tuple[str, str], str] = {}  # (folder, stamp) -> digest, for this process
# Any one of these lets AutoTokenizer build a tokenizer without the hub (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# What a model's behaviour depends on besides its weights: its config and every tokenizer file transformers reads.
# Records beside the model (manifest.json with wall time, member.json, mergekit's config with parent paths) are not
# part of its content: re-making an identical merge must keep every downstream cache.
MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    *TOKENIZER_FILES, "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
})


class CheckpointError(UserError):
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


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (safe_open checks header and size, without reading the
    tensors), or None: a file cut short by a full disk or a killed copy is caught before any stage reads it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            return None
    except (SafetensorError, OSError) as error:
        return f"{path}: truncated or corrupt safetensors file ({error}); copy or download it again"


def _config_problems(folder: Path, trust_remote_code: bool) -> list[str]:
    """config.json readable and naming a causal language model transformers knows (no remote code needed)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"{folder}: no config.json (a model folder holds config.json, weights and a tokenizer)"]
    except (OSError, ValueError) as error:
        return [f"{path}: unreadable ({type(error).__name__}: {error})"]
    if not isinstance(config, dict):
        return [f"{path}: expected a JSON object, got {type(config).__name__}"]
    if trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        return []
    model_type, architectures = config.get("model_type"), config.get("architectures")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [f"{path}: model_type={model_type!r} is not a causal language model this transformers knows "
                f"(merge-eval loads AutoModelForCausalLM without remote code)"]
    known = {name for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
             for name in ((value,) if isinstance(value, str) else value)}
    if isinstance(architectures, list) and architectures and not known & set(map(str, architectures)):
        return [f"{path}: architectures={architectures!r} has no causal-LM head (e.g. a classifier's config)"]
    return []


def checkpoint_problems(folder: Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> list[str]:
    """Everything wrong with a model folder that can be seen without loading it, one line each naming the file:
    config.json, weight files (whole safetensors; shards an index names), a tokenizer."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    problems = _config_problems(folder, trust_remote_code)
    try:
        files = weight_files(folder, allow_pickle)
    except CheckpointError as error:
        files = []
        problems.append(str(error))
    problems += [p for p in map(safetensors_problem, (f for f in files if f.suffix == ".safetensors")) if p]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            problems.append(f"{index}: unreadable shard index ({type(error).__name__}: {error})")
        else:
            problems += [f"{folder / str(s)}: missing (named by {index.name})" for s in sorted(map(str, shards))
                         if not (folder / s).is_file()]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{folder}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return problems


def resolve_source(source: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local folder for a config `source`: the embedded family, a folder, or a hub repo id (the cached snapshot,
    downloaded first when online and missing; every hub failure is a `HubError` line)."""
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
    return hub.download(source, revision, allow_pickle)


def model_files(folder: Path) -> list[Path]:
    """The files a model's content is: weights (safetensors, or pickle .bin), config and tokenizer."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and (p.suffix in {".safetensors", ".bin"} or p.name in MODEL_FILES))


def hub_blobs(folder: Path, files: list[Path]) -> list[list[str]] | None:
    """[[file, blob]] when `folder` is a snapshot of the Hugging Face cache (`models--org--name/snapshots/<commit>`)
    whose files all link into the repo's `blobs/`, else None. The hub names each blob by its content (sha256 for
    LFS files such as weights, the git blob sha1 for small files), so these names are the snapshot's content."""
    folder = Path(folder).absolute()
    blobs = folder.parent.parent / "blobs"
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith("models--"):
        return None
    pairs = []
    for path in files:
        target = path.resolve()
        if not path.is_symlink() or target.parent != blobs.resolve():
            return None
        pairs.append([path.name, target.name])
    return pairs


def content_digest(folder: Path, memo_dir: Path | None = None) -> str:
    """Digest of the checkpoint's weights, config and tokenizer (`model_files`). A hub cache snapshot's digest is
    its blobs' names (no byte is read); a folder's is its files' bytes, remembered by (name, size, mtime) in this
    process and, given `memo_dir` (the run's cache), across runs. Nothing is ever written beside the model: a
    user's model folder or hub cache may be read-only, shared, or not theirs to change."""
    folder = Path(folder)
    files = model_files(folder)
    blobs = hub_blobs(folder, files)
    if blobs is not None:
        return cache_key("hub-blobs", blobs)
    where = str(folder.resolve())
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    seen = (where, json.dumps(stamp))
    if seen in _DIGESTS:
        return _DIGESTS[seen]
    memo = Path(memo_dir) / DIGEST_MEMOS / f"{cache_key(where)}.json" if memo_dir is not None else None
    cached = read_cached(memo, lambda path: json.loads(path.read_text())) if memo is not None else None
    if isinstance(cached, dict) and cached.get("stamp") == stamp and isinstance(cached.get("digest"), str):
        value = cached["digest"]
    else:
        value = files_digest(files)
        if memo is not None:
            atomic_write_text(memo, json.dumps({"folder": where, "stamp": stamp, "digest": value}))
    _DIGESTS[seen] = value
    return value


def load_model(folder: Path, options: LoadOptions, attn_implementation: str | None = None):
    """(model, tokenizer) in the config's precision on its device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems = checkpoint_problems(Path(folder), options.allow_pickle, options.trust_remote_code)
    if problems:
        raise CheckpointError("\n".join(problems))
    kwargs = {"dtype": options.dtype, "trust_remote_code": options.trust_remote_code,
              "use_safetensors": None if options.allow_pickle else True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(options.torch_device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
