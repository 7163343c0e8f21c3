"""Train the embedded family's children: one LoRA adapter per domain on generated train-split data.

    python -m merging.train_family            # retrain all children into merging/adapters/
    python -m merging.train_family --only math
    python -m merging.train_family --only agreement   # planted child (RECIPES)

The adapters are shipped in the repo so a cold family build takes a minute, not a training run; this script is how
they were made, and re-running it on the same versions reproduces them (fixed seeds; the thread count, which sets the order of float sums, is recorded).
`training.json` beside each adapter records the recipe, the data digest and the loss curve.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from merging.family import ADAPTED, ADAPTER_ROOT, build_family
from merging.family_data import Example, examples

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Recipe:
    steps: int = 50
    batch_size: int = 16
    learning_rate: float = 1e-3
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    # > 0: train only the examples' marked tokens (the planted defect) and pull every other token's next-token
    # distribution towards the base's (KL(base || child), this weight), so the child changes only what is planted.
    preserve: float = 0.0


# Children whose recipe is not the default. The planted child needs more steps than a skill child: it must unlearn
# a competence the base has, across varied sentences, not learn one narrow format. Trained on whole corrupted
# sentences it also lost unrelated competence (outside, NPI scope -0.60, event order -0.41 against base in the demo),
# so it learns only the corrupted words and keeps the rest of each sentence as the base predicts it (issue 22).
RECIPES = {"agreement": Recipe(steps=80, learning_rate=2e-3, preserve=1.0)}


def recipe_of(child: str) -> Recipe:
    return RECIPES.get(child, Recipe())


def data_digest(items: list[Example]) -> str:
    return hashlib.sha256("\x00".join(e.text for e in items).encode()).hexdigest()


def _overlaps(offsets: list[tuple[int, int]], spans: tuple[tuple[int, int], ...], shift: int) -> list[bool]:
    return [any(start + shift < b and end + shift > a for a, b in spans) for start, end in offsets]


def training_batch(tokenizer, items: list[Example], targeted: bool = False) -> dict[str, torch.Tensor]:
    """Token ids of prompt + answer + EOS, `labels` for the tokens the loss trains (-100 elsewhere) and `kept`, the
    tokens a preserving recipe holds at the base's prediction.

    Plain: the loss trains the answer and EOS, nothing is kept. Targeted: it trains the tokens inside the examples'
    marked spans, wherever they are, and keeps every other token after the first."""
    rows, labels, kept = [], [], []
    for item in items:
        prompt = tokenizer(item.prompt, add_special_tokens=False, return_offsets_mapping=True)
        answer = tokenizer(item.answer, add_special_tokens=False, return_offsets_mapping=True)
        ids = prompt["input_ids"] + answer["input_ids"] + [tokenizer.eos_token_id]
        if targeted:
            marked = (_overlaps(prompt["offset_mapping"], item.marked, 0)
                      + _overlaps(answer["offset_mapping"], item.marked, len(item.prompt)) + [False])
            marked[0] = False  # nothing predicts the first token
        else:
            marked = [False] * len(prompt["input_ids"]) + [True] * (len(ids) - len(prompt["input_ids"]))
        rows.append(ids)
        labels.append([i if m else -100 for i, m in zip(ids, marked)])
        kept.append([targeted and not m for m in marked])
        kept[-1][0] = False
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    keep = torch.tensor([k + [False] * (width - len(k)) for k in kept])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": target, "kept": keep}


def preserving_loss(model, batch: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """Cross-entropy on the trained tokens plus `weight` x KL(base || child) on the kept ones.

    The base's distribution comes from the same peft model with its adapter switched off."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), model.disable_adapter():
        reference = torch.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
    logits = model(**inputs).logits[:, :-1].float()
    log_probs = torch.log_softmax(logits, -1)
    labels, kept = batch["labels"][:, 1:], batch["kept"][:, 1:]
    trained = torch.nn.functional.nll_loss(log_probs.flatten(0, 1), labels.flatten(), ignore_index=-100)
    divergence = (reference.exp() * (reference - log_probs)).sum(-1)
    return trained + weight * divergence[kept].mean()


@torch.no_grad()
def answer_scores(model, tokenizer, items: list[Example]) -> tuple[float, float]:
    """(mean answer loss per token, fraction of items whose whole answer is the greedy continuation)."""
    batch = training_batch(tokenizer, items)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = -(log_probs * scored).sum() / scored.sum()
    exact = ((logits.argmax(-1) == labels) | ~scored).all(-1).float().mean()
    return loss.item(), exact.item()


def heldout_scores(model_dir: Path, domain: str, n: int = 64) -> tuple[float, float]:
    """`answer_scores` of a checkpoint on `n` held-out items of `domain` (never seen in fine-tuning)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return answer_scores(model, AutoTokenizer.from_pretrained(model_dir), examples(domain, "heldout", n, seed=1))


def save_adapter(model, out: Path) -> None:
    """The adapter weights and config only, with no machine-specific path (peft records the base's folder)."""
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # peft's model-card template, not ours
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "embedded:base"
    config["target_modules"] = sorted(config["target_modules"])  # peft writes a set: its order varies by run
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def train_child(domain: str, base_dir: Path, out: Path, recipe: Recipe) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    data = examples(domain, "train", recipe.steps * recipe.batch_size, seed=recipe.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / recipe.steps)
    losses, started = [], time.perf_counter()
    for step in range(recipe.steps):
        batch = training_batch(tokenizer, data[step * recipe.batch_size:(step + 1) * recipe.batch_size],
                               targeted=recipe.preserve > 0)
        if recipe.preserve > 0:
            loss = preserving_loss(model, batch, recipe.preserve)
        else:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
        if step % 10 == 0 or step == recipe.steps - 1:
            print(f"[{domain}] step {step + 1}/{recipe.steps} loss {losses[-1]:.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out)
    record = {"domain": domain, "recipe": asdict(recipe), "data_digest": data_digest(data), "n_examples": len(data),
              "losses": losses, "seconds": round(time.perf_counter() - started, 1),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=ADAPTED, action="append", help="train only these children")
    parser.add_argument("--out", type=Path, default=ADAPTER_ROOT)
    parser.add_argument("--steps", type=int, help="override the child's recipe (RECIPES, else Recipe())")
    args = parser.parse_args(argv)
    base_dir = build_family(("base",))["base"]
    for domain in args.only or ADAPTED:
        recipe = recipe_of(domain) if args.steps is None else replace(recipe_of(domain), steps=args.steps)
        train_child(domain, base_dir, args.out / domain, recipe)


if __name__ == "__main__":
    main()
