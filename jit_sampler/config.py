"""JiT sampler configuration: a validated dataclass plus the published presets.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` whose message
starts with ``"JiTConfig.<field>"`` so the caller sees which knob is wrong.

DMF default. docs/method.md section 5 offers two discretisations of the micro-flow at a stage
transition: the paper's Algorithm 1 assigns the newly activated tokens their target
``y*_R`` (the exact solution of the micro-flow ODE, which has the flow's marginal at
``sigma_i``), while the released reference blends once with weight ``1/3``, which leaves
two thirds of the over-noised interpolated value in place. The presets ``"4x"`` and
``"7x"`` follow the paper (``dmf_mode="assign"``): it is the behaviour the method's
argument supports. ``"reference"`` (alias ``"4x-reference"``) and ``"7x-reference"``
reproduce the published pipeline (``blend`` with 3 relax steps) except that every random
draw comes from the caller's generator.

Anchor-list order. The nearest-anchor fill resolves ties (frequent on lattices) to the
anchor listed first, so the order of the active-token list changes the result. The
published pipeline keeps the list in insertion order (``anchor_order="insertion"``: the
initial lattice row-major, then the random fill in draw order, then each transition's ITA
picks in descending importance; the last transition appends the rest row-major); the
reference presets do the same, and with the same ``init_anchors`` and ``dmf_noise`` they
equal that pipeline to float tolerance. The paper presets keep the list sorted
(``anchor_order="sorted"``): ties then go to the lower token index, a rule that depends on
the set alone (not on the history that built it), and gathers read memory in order. The
two orders give different but equally valid lifts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

import jit_kernels as jk

from .scalar_checks import is_integer
from .schedule import StageLayout, resolve_stages

__all__ = ["JiTConfig", "PRESETS", "STAGE_RATIOS", "available_presets"]

#: Stage boundaries as fractions of the total steps (docs/method.md section 6).
STAGE_RATIOS = (0.4, 0.65, 1.0)

_INIT_GRIDS = ("checkerboard", "stride")
_SCHEDULES = ("beta", "pipeline")
_DMF_MODES = ("assign", "blend", "substeps")
_DMF_NOISE = ("independent", "initial")
_POLICIES = ("shared", "per_sample")
_ORDERS = ("sorted", "insertion")


def is_int_at_least(value, lowest: int) -> bool:
    """``value`` is a Python ``int`` (not a bool; :func:`~jit_sampler.scalar_checks.is_integer`) and ``>= lowest``."""
    return is_integer(value, "int") and value >= lowest


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"JiTConfig.{name}: {msg}")


def _check_ratios(name: str, ratios) -> tuple[float, ...]:
    """Ratios must be a non-empty, strictly increasing sequence in (0, 1] ending at 1."""
    if isinstance(ratios, (str, bytes)):
        raise _err(name, f"must be a sequence of floats, got {ratios!r}")
    try:
        vals = tuple(float(r) for r in ratios)
    except (TypeError, ValueError) as exc:
        raise _err(name, f"must be a sequence of floats, got {ratios!r}") from exc
    if not vals:
        raise _err(name, "must not be empty")
    for r in vals:
        if not (math.isfinite(r) and 0.0 < r <= 1.0):
            raise _err(name, f"every ratio must be in (0, 1], got {vals}")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise _err(name, f"ratios must be strictly increasing, got {vals}")
    if vals[-1] != 1.0:
        raise _err(name, f"the last ratio must be 1 (the last stage is dense and ends the run), got {vals[-1]}")
    return vals


@dataclass(frozen=True)
class JiTConfig:
    """How one JiT run is scheduled.

    Few steps. Any ``total_steps >= 1`` is accepted (FLUX.1-schnell and distilled FLUX.2-klein
    run 4 steps, img2img ``steps * strength``). The stages that run (:meth:`layout`) obey: no
    stage is empty, no transition falls at step 0, the last stage is dense. With ``K`` stages
    and ``n`` steps:

    - ``n >= K``: stage ``k`` ends at ``int(n * r_k)``, clamped into
      ``[end_{k-1} + 1, n - (K - 1 - k)]``. The clamp is a no-op wherever ``int(n * r)`` is
      already valid (the presets at 18 / 11 steps and every count accepted before), so those
      layouts are unchanged; colliding ends move minimally (3 steps of (0.4, 0.65, 1.0):
      ends 1 / 1 / 3 become 1 / 2 / 3).
    - ``n < K``: the ``K - n`` sparsest stages are dropped and the ``n`` densest run one step
      each (7x: 1 step = dense only, 2 steps = 60 % then 100 %). Why the densest: with so few
      steps each one spans a large part of the sigma range, and the first one (at sigma = 1)
      fixes the global layout that a distilled model never revisits. Dropping from the sparse
      end degrades gracefully towards the dense sampler (1 step *is* dense Euler) and keeps
      each transition small; keeping the sparsest stage instead (32 % then 100 %) would save
      more, but the single transition would have to conjure 68 % of the tokens from one
      coarse estimate, with one step left to repair them. At ``n = K`` the clamp has already
      cut every stage to one step, so each step fewer must drop a whole stage; dropping the
      sparsest moves the run towards dense Euler rather than away from it.

    ``num_stages``, ``stage_ends``, ``stage_steps``, ``stage_token_ratios``,
    ``token_counts``, ``full_step_equivalents``, the plan's ``stage_of_step`` and the report
    all count the stages that run (``effective_stages`` maps them to the configured ones);
    ``init_anchors`` must have the budget of the first stage that runs.

    Attributes:
        total_steps: number of sampler steps (= velocity evaluations per sample and CFG branch),
            any int ``>= 1`` (see "Few steps" above).
        stage_ratios: cumulative step fractions ending each stage, sparsest first
            (``stage_ends = [int(total_steps * r)]`` unless that collides, see above);
            strictly increasing, last 1.
        token_ratios: active-token fraction per stage, sparsest first
            (``m_k = int(N * r)``); strictly increasing, last 1.0 (the final stage is dense).
        init_grid: ``"checkerboard"`` (stride-2 lattice + border) or ``"stride"``.
        ita: importance-guided token activation at transitions; ``False`` adds the tokens
            farthest from the current anchors instead (a static, content-free refinement).
        sigma_schedule: ``"beta"`` (Beta-warped with ``beta_alpha`` / ``beta_beta``, no shift)
            or ``"pipeline"`` (the wrapped pipeline's own schedule).
        dmf_mode: ``"assign"`` | ``"blend"`` (weight ``1 / relax_steps``) | ``"substeps"``
            (``dmf_substeps`` blends with weights ``1/n, 1/(n-1), ..., 1``).
        dmf_noise: ``"independent"`` (one seeded ``[B, N, C]`` draw per run, each new token reading
            its position's row), ``"initial"`` (the initial
            latent noise of the new tokens) or a ``[B, N, C]`` tensor whose rows are used.
        blur_scale: the lift's blur scale (``sigma_blur = clip(scale / sqrt(rho), 1, 10)``).
        anchor_policy: ``"shared"`` (one token set for the batch, batch-mean importance) or
            ``"per_sample"`` (each sample its own set of equal size).
        anchor_order: ``"sorted"`` (the active list ascending; nearest-anchor ties go to the
            lower token index) or ``"insertion"`` (the published pipeline's list order, see
            the module docstring; ties go to the earlier-activated anchor).
        init_anchors: ``None`` (draw the initial anchors: lattice + random fill from the
            generator) or an int64 tensor ``[M0]`` (``[B, M0]`` with ``anchor_policy=
            "per_sample"``) of unique token indices, the initial anchor list in the order to
            use (``M0`` = the first stage's budget; sorted first under ``"sorted"``). With
            ``dmf_noise`` a tensor too, a run draws nothing.
        backend: ``jit_kernels`` backend passed to every op.
        token_bucket: ``0`` (off) or a multiple such as 64: the transformer sees the active
            tokens padded up to a multiple of it, the padding masked out of attention, so a
            compiled transformer sees a small fixed set of sequence lengths across runs and
            resolutions (the padded rows are dropped; valid rows are unchanged up to
            floating-point summation order).
        token_multiple: round every stage's token budget *up* to a multiple of this (real extra
            tokens, no padding): for sequence parallelism, where each rank must hold an equal
            share of the sequence (``docs/parallelism.md``). ``1`` = the paper's budgets.
        name: preset name, for reports only.
    """

    total_steps: int = 18
    stage_ratios: tuple[float, ...] = STAGE_RATIOS
    token_ratios: tuple[float, ...] = (0.35, 0.62, 1.0)
    init_grid: str = "checkerboard"
    ita: bool = True
    sigma_schedule: str = "beta"
    beta_alpha: float = 1.4
    beta_beta: float = 0.425
    dmf_mode: str = "assign"
    relax_steps: int = 3
    dmf_substeps: int = 3
    dmf_noise: Any = field(default="independent", compare=False)
    blur_scale: float = 0.4
    anchor_policy: str = "shared"
    anchor_order: str = "sorted"
    init_anchors: Any = field(default=None, compare=False)
    backend: str = "auto"
    token_bucket: int = 0
    token_multiple: int = 1
    name: str | None = field(default=None, compare=False)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen dataclass: normalise through object.__setattr__
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int):
            raise _err("total_steps", f"must be an int, got {self.total_steps!r}")
        if self.total_steps < 1:
            raise _err("total_steps", f"must be >= 1, got {self.total_steps}")
        set_(self, "stage_ratios", _check_ratios("stage_ratios", self.stage_ratios))
        set_(self, "token_ratios", _check_ratios("token_ratios", self.token_ratios))
        if len(self.token_ratios) != len(self.stage_ratios):
            raise _err("token_ratios", f"needs one ratio per stage ({len(self.stage_ratios)}), got {len(self.token_ratios)}")
        for name, allowed in (("init_grid", _INIT_GRIDS), ("sigma_schedule", _SCHEDULES), ("dmf_mode", _DMF_MODES),
                              ("anchor_policy", _POLICIES), ("anchor_order", _ORDERS), ("backend", jk.BACKENDS)):
            if getattr(self, name) not in allowed:
                raise _err(name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.ita, bool):
            raise _err("ita", f"must be a bool, got {self.ita!r}")
        for name in ("beta_alpha", "beta_beta", "blur_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise _err(name, f"must be a positive finite number, got {v!r}")
            set_(self, name, float(v))
        for name in ("relax_steps", "dmf_substeps"):
            v = getattr(self, name)
            if not is_int_at_least(v, 1):
                raise _err(name, f"must be an int >= 1, got {v!r}")
        if not is_int_at_least(self.token_multiple, 1):
            raise _err("token_multiple", f"must be an int >= 1, got {self.token_multiple!r}")
        if not is_int_at_least(self.token_bucket, 0):
            raise _err("token_bucket", f"must be an int >= 0 (0 = off), got {self.token_bucket!r}")
        if isinstance(self.dmf_noise, torch.Tensor):
            if self.dmf_noise.dim() != 3 or not self.dmf_noise.is_floating_point():
                raise _err("dmf_noise", f"a tensor must be float [B, N, C], got {self.dmf_noise.dtype} "
                           f"{tuple(self.dmf_noise.shape)}")
        elif not isinstance(self.dmf_noise, str) or self.dmf_noise not in _DMF_NOISE:
            raise _err("dmf_noise", f"must be one of {_DMF_NOISE} or a [B, N, C] tensor, got {self.dmf_noise!r}")
        a = self.init_anchors
        if a is not None:
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"JiTConfig.init_anchors: must be None or an int64 tensor, got {type(a).__name__}")
            if a.dtype != torch.int64:
                raise TypeError(f"JiTConfig.init_anchors: must be int64, got {a.dtype}")
            want = 1 if self.anchor_policy == "shared" else 2
            if a.dim() != want or a.shape[-1] == 0:
                raise _err("init_anchors", f"must be a non-empty {'[M0]' if want == 1 else '[B, M0]'} tensor with "
                           f"anchor_policy={self.anchor_policy!r}, got shape {tuple(a.shape)}")

    # ----------------------------------------------------------------- derived
    def layout(self) -> StageLayout:
        """The stages this run keeps and where they end (:func:`~jit_sampler.schedule.resolve_stages`).

        Every stage-indexed quantity below (``num_stages``, ``stage_ends``, ``stage_steps``,
        ``stage_token_ratios``, ``token_counts``, :func:`~jit_sampler.make_plan`'s
        ``stage_of_step``) counts these stages only.
        """
        return resolve_stages(self.total_steps, self.stage_ratios)

    @property
    def effective_stages(self) -> tuple[int, ...]:
        """Configured index of every stage that runs, sparsest first: ``(0, 1, 2)`` for the
        presets at their own steps, ``(1, 2)`` for a three-stage config at 2 steps, ``(2,)`` at 1."""
        return self.layout().stages

    @property
    def num_stages(self) -> int:
        """Stages that run (``len(stage_ratios)`` unless ``total_steps`` is smaller)."""
        return len(self.effective_stages)

    @property
    def stage_token_ratios(self) -> tuple[float, ...]:
        """``token_ratios`` of the stages that run, sparsest first (last 1.0)."""
        return tuple(self.token_ratios[k] for k in self.effective_stages)

    @property
    def stage_ends(self) -> list[int]:
        """Exclusive end step of each stage that runs, sparsest first, e.g. ``[7, 11, 18]`` for the 4x preset."""
        return list(self.layout().ends)

    @property
    def stage_steps(self) -> list[int]:
        """Steps per stage that runs (each ``>= 1``), e.g. ``[7, 4, 7]`` for the 4x preset."""
        return list(self.layout().steps)

    @property
    def dmf_weights(self) -> tuple[float, ...]:
        """The blend weights applied in order at a transition (``(1.0,)`` is an assignment)."""
        if self.dmf_mode == "assign":
            return (1.0,)
        if self.dmf_mode == "blend":
            return (1.0 / self.relax_steps,)
        n = self.dmf_substeps
        return tuple(1.0 / (n - j) for j in range(n))

    def token_counts(self, num_tokens: int) -> list[int]:
        """Active tokens per stage that runs for an ``N``-token grid: ``[max(1, int(N * r))]``, last ``N``."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        counts = [max(1, min(num_tokens, int(num_tokens * r))) for r in self.stage_token_ratios]
        if self.token_multiple > 1:  # round budgets up (sequence parallelism: divisible by the world size)
            q = self.token_multiple
            counts = [min(num_tokens, -(-c // q) * q) for c in counts]
        counts[-1] = num_tokens
        return counts

    def full_step_equivalents(self) -> float:
        """Sum over steps of the active-token ratio (11.93 for 4x): the linear cost model of docs/method.md section 7."""
        lay = self.layout()
        return sum(s * self.token_ratios[k] for s, k in zip(lay.steps, lay.stages))

    def replace(self, **changes) -> "JiTConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "JiTConfig":
        """A published preset: ``"4x"``, ``"7x"``, ``"reference"`` (= ``"4x-reference"``), ``"7x-reference"``.

        ``overrides`` change fields, e.g. ``JiTConfig.preset("7x", dmf_mode="blend")``.
        """
        if not isinstance(name, str) or name.lower() not in PRESETS:
            raise ValueError(f"JiTConfig.preset: unknown preset {name!r}; expected one of {available_presets()}")
        kw = dict(PRESETS[name.lower()])
        kw["name"] = name.lower()
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def dense(cls, total_steps: int, **overrides) -> "JiTConfig":
        """One stage with every token active: plain Euler on the same loop (the dense baseline)."""
        kw = dict(total_steps=total_steps, stage_ratios=(1.0,), token_ratios=(1.0,), name=f"dense-{total_steps}")
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def coerce(cls, jit) -> "JiTConfig | None":
        """``None`` -> ``None``; a preset name -> its config; a ``JiTConfig`` -> itself."""
        if jit is None or isinstance(jit, JiTConfig):
            return jit
        if isinstance(jit, str):
            return cls.preset(jit)
        raise TypeError(f"jit must be None, a preset name or a JiTConfig, got {type(jit).__name__}")


_PAPER = dict(stage_ratios=STAGE_RATIOS, init_grid="checkerboard", ita=True, sigma_schedule="beta",
              beta_alpha=1.4, beta_beta=0.425, dmf_mode="assign", dmf_noise="independent")
_REFERENCE = dict(_PAPER, dmf_mode="blend", relax_steps=3, anchor_order="insertion")

#: Preset name -> JiTConfig keyword arguments.
PRESETS: dict[str, dict] = {
    "4x": dict(_PAPER, total_steps=18, token_ratios=(0.35, 0.62, 1.0)),
    "7x": dict(_PAPER, total_steps=11, token_ratios=(0.32, 0.60, 1.0)),
    "4x-reference": dict(_REFERENCE, total_steps=18, token_ratios=(0.35, 0.62, 1.0)),
    "7x-reference": dict(_REFERENCE, total_steps=11, token_ratios=(0.32, 0.60, 1.0)),
}
PRESETS["reference"] = PRESETS["4x-reference"]


def available_presets() -> list[str]:
    """Names accepted by :meth:`JiTConfig.preset`."""
    return sorted(PRESETS)
