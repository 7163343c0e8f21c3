"""Merge methods merge-eval knows, each with its typed parameters, mapped onto mergekit's merge configuration.

mergekit validates its own configs only when a merge starts; this registry lets `merge-eval validate` reject an
unknown method or an out-of-range parameter before any work, with the field and value named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["model", "global"]


@dataclass(frozen=True)
class Param:
    """One merge parameter: where mergekit reads it, its allowed range and default."""

    name: str
    scope: Scope
    low: float
    high: float
    default: float | None = None

    def check(self, value: object) -> str | None:
        """A problem with `value`, or None when it is valid."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not self.low <= value <= self.high:
            return f"must be in [{self.low}, {self.high}], got {value!r}"
        return None


@dataclass(frozen=True)
class Method:
    name: str
    mergekit_name: str
    params: tuple[Param, ...]
    uses_base: bool  # needs the shared base model (task-vector methods)
    exactly_two: bool = False  # interpolation between exactly two parents
    randomized: bool = False  # draws random masks: mergekit needs a seed for reproducibility

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# Negative weights (task negation) are deliberately out of range: merge-eval compares merges of parents.
_WEIGHT = Param("weight", "model", 0.0, 2.0, 1.0)
_DENSITY = Param("density", "model", 0.0, 1.0, 0.5)

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", "linear", (Param("weight", "model", 0.0, 2.0, 0.5),), uses_base=False),
    Method("slerp", "slerp", (Param("t", "global", 0.0, 1.0, 0.5),), uses_base=False, exactly_two=True),
    Method("task_arithmetic", "task_arithmetic", (_WEIGHT,), uses_base=True),
    Method("ties", "ties", (_WEIGHT, _DENSITY), uses_base=True),
    Method("dare_ties", "dare_ties", (_WEIGHT, _DENSITY), uses_base=True, randomized=True),
    Method("dare_linear", "dare_linear", (_WEIGHT, _DENSITY), uses_base=True, randomized=True),
    Method("breadcrumbs", "breadcrumbs", (_WEIGHT, _DENSITY, Param("gamma", "model", 0.0, 1.0, 0.01)),
           uses_base=True),
    Method("della", "della", (_WEIGHT, _DENSITY, Param("epsilon", "model", 0.0, 0.5, 0.1),
                              Param("lambda", "global", 0.0, 2.0, 1.0)), uses_base=True, randomized=True),
    Method("model_stock", "model_stock", (), uses_base=True),
]}


def mergekit_config(method: Method, parameters: dict[str, float], parents: list[str], base: str | None,
                    dtype: str) -> dict:
    """The mergekit MergeConfiguration dict for `parents` (checkpoint paths) merged by `method`."""
    values = {p.name: parameters.get(p.name, p.default) for p in method.params}
    per_model = {k: v for k, v in values.items() if method.param(k).scope == "model"}
    global_params = {k: v for k, v in values.items() if method.param(k).scope == "global"}
    config: dict = {"merge_method": method.mergekit_name, "dtype": dtype}
    if method.exactly_two:
        # mergekit's slerp interpolates from base_model (t=0) to the other model (t=1).
        config["base_model"] = parents[0]
        config["models"] = [{"model": p} for p in parents]
    else:
        config["models"] = [{"model": p, "parameters": dict(per_model)} for p in parents]
        if method.uses_base:
            config["base_model"] = base
    if global_params:
        config["parameters"] = global_params
    return config
