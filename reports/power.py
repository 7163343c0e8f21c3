"""What a test over n units can support: the smallest |r| it detects, and whether it may report an r at all.

A correlation over n units whose x takes few distinct values asks whether the groups of units that share an x
differ, whatever x is (two parent pairs give a parent-pair feature two values over ten merges): such a test gets a
reason, not an r, below `MIN_DISTINCT` distinct x values. The smallest detectable |r| uses Fisher's z
approximation, atanh(r) ~ Normal(atanh(rho), 1 / (n - 3)), a two-sided test at `alpha` and the given power.
"""

from __future__ import annotations

import math

from scipy import stats

MIN_DISTINCT = 5
ALPHA = 0.05
POWER = 0.8


def min_detectable_r(n: int | None, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest |r| a two-sided test at `alpha` detects with probability `power` over n units (NaN for n <= 3,
    where Fisher's z has no variance to speak of)."""
    if n is None or n <= 3:
        return math.nan
    z = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / math.sqrt(n - 3)
    return math.tanh(z)


def too_few_values(distinct: int, n: int, units: str, minimum: int = MIN_DISTINCT) -> str | None:
    """Why a test over n units whose x takes `distinct` values reports no r, or None when it may."""
    if distinct >= minimum:
        return None
    return f"x takes {distinct} value{'s' if distinct != 1 else ''} over {n} {units} (fewer than {minimum})"
