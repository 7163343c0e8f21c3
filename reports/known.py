"""The known answer a config declares (`known_effects`), and whether the run found it.

A config that plants an effect says so in advance:

    known_effects:
      - model: agreement_broken          # the model that carries the effect
        tasks: [suite-subject_verb_agreement]   # probing/behaviour task names (the same string, inside and out)
        phenomena: [morphology]          # and/or phenomena
        direction: worse                 # worse | better, against `base`
        layers: [0, 10]                  # optional: the first and last layer where it is expected inside

The findings open with each declared effect: found or not inside (and the first layer band where it shows) and
outside, from the "what changed" tests against base (reports.changes, which test every model alike); the
dose-response r of every series that merges the model (reports.primary); and how many non-target phenomena and
tasks of the model came out significant (false positives).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from reports.changes import BANDS
from reports.primary import BY_NAME, dose_series
from runstore.errors import UserError

DIRECTIONS = {"worse": -1, "better": 1}


class KnownEffectError(UserError):
    """config.yaml's known_effects entry is malformed."""


@dataclass(frozen=True)
class KnownEffect:
    model: str
    tasks: tuple[str, ...] = ()
    phenomena: tuple[str, ...] = ()
    direction: str = "worse"
    layers: tuple[int, int] | None = None

    @property
    def targets(self) -> set[str]:
        return set(self.tasks) | set(self.phenomena)


def known_effects(config: dict | None) -> list[KnownEffect]:
    """The config's declared effects (none when it declares none)."""
    found = []
    for i, entry in enumerate((config or {}).get("known_effects") or []):
        where = f"config.yaml: known_effects[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise KnownEffectError(f"{where}: {entry!r} needs a `model` name")
        direction = entry.get("direction", "worse")
        if direction not in DIRECTIONS:
            raise KnownEffectError(f"{where}.direction: {direction!r} is not one of {', '.join(DIRECTIONS)}")
        lists = {k: entry.get(k) or [] for k in ("tasks", "phenomena")}
        for key, value in lists.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise KnownEffectError(f"{where}.{key}: {value!r} is not a list of names")
        if not lists["tasks"] and not lists["phenomena"]:
            raise KnownEffectError(f"{where}: names neither tasks nor phenomena")
        layers = entry.get("layers")
        if layers is not None and not (isinstance(layers, list) and len(layers) == 2
                                       and all(isinstance(v, int) and not isinstance(v, bool) for v in layers)):
            raise KnownEffectError(f"{where}.layers: {layers!r} is not [first, last]")
        found.append(KnownEffect(entry["model"], tuple(lists["tasks"]), tuple(lists["phenomena"]), direction,
                                 tuple(layers) if layers else None))
    return found


def _side(rows: pl.DataFrame, side: str, sign: int) -> dict:
    """Whether any target test of one side resolves in the declared direction; its strongest, the bands, and how
    many target tests resolve the other way (a planted loss that shows up as a gain is reported, not hidden)."""
    resolved = rows.filter((pl.col("side") == side) & pl.col("significant"))
    hits, against = resolved.filter(pl.col("diff") * sign > 0), resolved.filter(pl.col("diff") * sign < 0)
    tested = rows.filter(pl.col("side") == side)
    bands = [b for b in BANDS if b in set(hits["band"].drop_nulls())]
    first = hits.filter(pl.col("band") == bands[0]) if bands else hits
    strongest = first.sort(pl.col("diff").abs(), descending=True).head(1).to_dicts()
    return {"tested": tested.height, "found": hits.height > 0, "hits": hits.height, "against": against.height,
            "bands": bands,
            "first_band": bands[0] if bands else None, "strongest": strongest[0] if strongest else None}


def known_answer(effect: KnownEffect, changes: pl.DataFrame | None, correlations: pl.DataFrame | None,
                 outcomes: pl.DataFrame | None, phenomenon_of: dict[str, str]) -> dict:
    """One declared effect against what the run found (see the module docstring)."""
    sign = DIRECTIONS[effect.direction]
    target_phenomena = set(effect.phenomena) | {phenomenon_of[t] for t in effect.tasks if t in phenomenon_of}
    found = {"effect": effect, "inside": None, "outside": None, "dose": [], "false_phenomena": [],
             "false_tasks": [], "model_tested": False}
    if changes is not None:
        own = changes.filter((pl.col("model") == effect.model) & (pl.col("comparison") == "base"))
        found["model_tested"] = own.height > 0
        targets = own.filter(pl.col("task").is_in(list(effect.targets)))
        found["inside"], found["outside"] = _side(targets, "inside", sign), _side(targets, "outside", sign)
        other = own.filter(pl.col("significant"))
        found["false_phenomena"] = sorted(set(other.filter((pl.col("level") == "phenomenon")
                                                           & ~pl.col("task").is_in(list(target_phenomena)))["task"]))
        found["false_tasks"] = sorted(set(other.filter(
            (pl.col("level") == "task") & ~pl.col("task").is_in(list(effect.targets))
            & ~pl.col("task").replace_strict(phenomenon_of, default="").is_in(list(target_phenomena)))["task"]))
    if correlations is not None and outcomes is not None and "analysis" in correlations.columns:
        names = [s["name"] for s in dose_series(outcomes) if effect.model in (s["parent_a"], s["parent_b"])]
        dose = correlations.filter((pl.col("family").str.starts_with(BY_NAME["dose_response"].family))
                                   & pl.col("x").is_in(names) & pl.col("y").is_in(list(effect.targets)))
        found["dose"] = dose.sort("x", "y_kind", "y").to_dicts()
    return found
