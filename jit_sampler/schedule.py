"""Sigma schedules (docs/method.md section 6) and the stage layout of a run (also for few steps).

The Beta schedule needs the inverse of the regularised incomplete beta function. scipy is
not a dependency, so it is computed here in float64: ``I_x(a, b)`` by its continued
fraction (modified Lentz) and the inverse by safeguarded bisection, which converges to
machine precision in ~60 halvings and costs well under a millisecond per step.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from .scalar_checks import is_integer

__all__ = ["beta_cdf", "beta_ppf", "beta_sigmas", "linear_sigmas", "StageLayout", "resolve_stages", "stage_layout"]


def _betacf(x: float, a: float, b: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes ``betacf``)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` (the Beta(a, b) CDF) in float64."""
    if not (a > 0 and b > 0):
        raise ValueError(f"beta parameters must be positive, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(x, a, b) / a
    return 1.0 - front * _betacf(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse Beta(a, b) CDF at ``q`` in [0, 1], float64 (bisection to machine precision)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if q == 0.0:
        return 0.0
    if q == 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # interval can no longer shrink in float64
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta_sigmas(num_steps: int, alpha: float = 1.4, beta: float = 0.425) -> list[float]:
    """The Beta-warped FLUX schedule without resolution shift: ``num_steps + 1`` floats ending at 0.

    ``sigma_j = s_min + BetaPPF(1 - j / (n - 1); alpha, beta) * (s_max - s_min)`` with
    ``s_min = 1/n``, ``s_max = 1`` (diffusers' ``use_beta_sigmas`` on ``linspace(1, 1/n, n)``),
    then ``sigma_n = 0``. ``n = 1`` gives ``[1, 0]``.
    """
    if not is_integer(num_steps, "int") or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    n = num_steps
    if n == 1:
        return [1.0, 0.0]
    s_min, s_max = 1.0 / n, 1.0
    out = [s_min + beta_ppf(1.0 - j / (n - 1), alpha, beta) * (s_max - s_min) for j in range(n)]
    return out + [0.0]


def linear_sigmas(num_steps: int) -> list[float]:
    """FLUX's unshifted default ``linspace(1, 1/n, n)`` plus a final 0: ``num_steps + 1`` floats."""
    if not is_integer(num_steps, "int") or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    n = num_steps
    return [1.0 - j * (1.0 - 1.0 / n) / max(n - 1, 1) for j in range(n)] + [0.0]


class StageLayout(NamedTuple):
    """The stages a run of ``total_steps`` steps actually runs (see :func:`resolve_stages`).

    ``stages``: the configured index (into ``stage_ratios`` / ``token_ratios``) of every stage
    that runs, sparsest first; always ends with the last (dense) stage. ``ends``: the exclusive
    end step of each of them; strictly increasing, first ``>= 1``, last ``total_steps``.
    """

    stages: tuple[int, ...]
    ends: tuple[int, ...]

    @property
    def steps(self) -> tuple[int, ...]:
        """Steps per stage that runs (every entry ``>= 1``)."""
        return tuple(e - s for s, e in zip((0,) + self.ends[:-1], self.ends))

    @property
    def stage_of_step(self) -> tuple[int, ...]:
        """Stage of every step, counting only the stages that run (0 = the sparsest of them)."""
        return tuple(j for j, n in enumerate(self.steps) for _ in range(n))


def resolve_stages(total_steps: int, stage_ratios) -> StageLayout:
    """Which stages a ``total_steps``-step run keeps, and where each ends.

    The rule (docs/method.md section 6), for ``K`` configured stages and ``n`` steps:

    1. ``n >= K``: every stage runs. Stage ``k`` ends at ``int(n * r_k)`` (the published
       rule) clamped into ``[end_{k-1} + 1, n - (K - 1 - k)]``, i.e. at least one step for it
       and one for each stage after it. Where ``int(n * r)`` already gives a valid layout (no
       empty stage, no transition at step 0) the clamp changes nothing, so every preset and
       every step count accepted before keeps exactly its layout; otherwise only colliding
       ends move, by the least amount that separates them.
    2. ``n < K``: only the ``n`` densest stages (the last ``n``) run, one step each: one step
       is plain dense Euler, two steps of a three-stage config run the middle budget and then
       the dense one. See :class:`~jit_sampler.JiTConfig` for why the sparsest are dropped.

    Raises ``ValueError`` for ``total_steps`` that is not an int ``>= 1`` or no ratios.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    ratios = tuple(float(r) for r in stage_ratios)
    if not ratios:
        raise ValueError("stage_ratios must not be empty")
    return _layout(total_steps, ratios)


@functools.lru_cache(maxsize=256)
def _layout(n: int, ratios: tuple[float, ...]) -> StageLayout:
    """:func:`resolve_stages` on checked arguments, once per (steps, ratios): a config's properties and
    every plan read the same layout."""
    k_all = len(ratios)
    first = max(0, k_all - n)  # n < K: drop the sparsest K - n stages
    kept = tuple(range(first, k_all))
    k = len(kept)
    ends: list[int] = []
    prev = 0
    for j, s in enumerate(kept):
        raw = n if j == k - 1 else int(n * ratios[s])  # the last stage always runs to the end
        prev = min(max(raw, prev + 1), n - (k - 1 - j))
        ends.append(prev)
    return StageLayout(kept, tuple(ends))


def stage_layout(total_steps: int, stage_ratios) -> list[int]:
    """Stage index of every step, counting only the stages that run (0 = the sparsest of them).

    E.g. 4x -> ``[0]*7 + [1]*4 + [2]*7``; 3-stage ratios at 2 steps -> ``[0, 1]``, where 0 is
    the configured *middle* stage (:func:`resolve_stages` says which stages run).
    """
    return list(resolve_stages(total_steps, stage_ratios).stage_of_step)
