"""A gain read with its noise: the pretrained encoder against random init, paired on the same objects.

Both encoders' classifiers score the same evaluation objects, so the gain is read from per-object
differences: ``d_i = 1[pretrained correct on i] − 1[random init correct on i]``, the gain is ``mean(d)``
and its standard error ``std(d, ddof=1) / sqrt(n)``. Pairing removes the objects both get right (or both
wrong) from the noise, so the SE is that of the disagreements alone — smaller than two independent
accuracies' errors would be. The same for kNN (its per-object predictions) and, with episodes in place of
objects, for few-shot (per-episode accuracies on the same episodes).

The rule of every verdict printed: **above** (or **below**) random init only when ``|gain| ≥ 2·SE``,
otherwise **within noise (±2 SE)**. Two standard errors is a rough 95% interval of the gain, for one
comparison; reading many gains at once, some will cross it by chance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SE_RULE = 2.0  # a gain is called above/below random init when |gain| >= SE_RULE standard errors
WITHIN_NOISE = "within noise (±2 SE)"


@dataclass(frozen=True)
class PairedGain:
    """A gain (a fraction: 0.0375 = 3.75 points) and its paired standard error over ``n`` objects (NaN
    when it cannot be measured: fewer than two objects, or the baseline's predictions were not kept)."""

    gain: float
    se: float
    n: int

    @property
    def verdict(self) -> str:
        return verdict(self.gain, self.se)

    def text(self, digits: int = 2, scale: float = 100.0, unit: str = " points") -> str:
        """``+3.75 ± 1.90 points; above random init`` (fractions as points: ``scale`` 100)."""
        return gain_text(self.gain, self.se, digits, scale, unit)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_gain(
    correct: Sequence[float] | np.ndarray, baseline_correct: Sequence[float] | np.ndarray
) -> PairedGain:
    """The gain of ``correct`` over ``baseline_correct`` (per object: 1 correct, 0 not; or any per-item
    score, such as an episode's accuracy) and its standard error, ``std(d, ddof=1) / sqrt(n)`` of the
    per-item differences ``d``."""
    a = np.asarray(correct, np.float64).reshape(-1)
    b = np.asarray(baseline_correct, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired gain: {a.size} against {b.size} items; both must score the same items")
    n = int(a.size)
    if n == 0:
        return PairedGain(math.nan, math.nan, 0)
    d = a - b
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return PairedGain(float(d.mean()), se, n)


def verdict(gain: float, se: float) -> str:
    """``above random init`` / ``below random init`` when ``|gain| ≥ 2·SE`` (and the gain is not zero),
    else ``within noise (±2 SE)``; ``SE unknown`` when the SE is NaN."""
    if gain != gain:
        return "not measured"
    if se != se:
        return "SE unknown"
    if gain != 0 and abs(gain) >= SE_RULE * se:
        return "above random init" if gain > 0 else "below random init"
    return WITHIN_NOISE


def short_verdict(gain: float, se: float) -> str:
    """:func:`verdict` in a word or two, for the monitor's line: ``above``, ``below``, ``within noise``."""
    v = verdict(gain, se)
    return v.removesuffix(" random init").removesuffix(" (±2 SE)")


def gain_text(
    gain: float, se: float, digits: int = 2, scale: float = 100.0, unit: str = " points", short: bool = False
) -> str:
    """``+3.75 ± 1.90 points; above random init`` — the gain, its SE and the verdict (``short``: the
    monitor's ``+3.8 ± 1.9, above``)."""
    g = f"{scale * gain:+.{digits}f}"
    s = f"{scale * se:.{digits}f}" if se == se else "?"
    if short:
        return f"{g} ± {s}, {short_verdict(gain, se)}"
    return f"{g} ± {s}{unit}; {verdict(gain, se)}"
