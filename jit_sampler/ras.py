"""RAS (Region-Adaptive Sampling, arXiv 2502.10389) on ``jit_kernels``: ``RASConfig``, ``ras_sample``.

The algorithm, its defaults and where this implementation departs from the published code are
in ``docs/ras.md``. In short: from step ``scheduler_start_step`` on, most steps run the
transformer on the tokens whose last update had the *smallest* spread (per patch, scaled by a
drop-count factor) and give the other tokens the velocity they had when last computed; every
attention layer keeps the keys and values of all image tokens (:class:`RASKVCache`), so the
computed tokens attend to every token.

The velocity contract is :class:`~jit_sampler.sampler.VelocityFn`'s with one keyword more:

    velocity_fn(x [B, M, C], active_idx [B, M] | [M], sigma, step, kv=RASKVCache | None) -> v [B, M, C]

``kv`` is the call's cache object, in the mode the step needs (``"refresh"``: a dense step whose
keys and values a later RAS step reads; ``"sparse"``: a RAS step; ``"off"``). A velocity that
runs a diffusers transformer passes it to the attention processors of
:mod:`jit_sampler.pipelines.ras_attention` as the attention kwarg ``ras_kv``. With
``RASConfig(kv_cache=False)`` the loop passes ``kv=None`` (and a plain 4-argument callable
works): the computed tokens then attend only to each other.

All state (selection, drop counts, cached velocity, K/V caches) lives in the call.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

import jit_kernels as jk

from .report import JiTReport
from .scalar_checks import check_int, check_real, check_sigmas

__all__ = ["RASConfig", "RASKVCache", "RASReport", "RASFinalStage", "ras_sample", "skip_counts"]

_METRICS = ("std", "l2norm")


def _int(name: str, value, low: int | None = None) -> int:
    """A RASConfig int field (a Python int, :func:`~jit_sampler.scalar_checks.is_integer`)."""
    return check_int(f"RASConfig.{name}", value, low, kind="int")


def _float(name: str, value) -> float:
    """A RASConfig float field (a Python int or float)."""
    return check_real(f"RASConfig.{name}", value, kind="float")


@dataclass(frozen=True)
class RASConfig:
    """The settings of a RAS run, with the published defaults (``docs/ras.md`` section 2).

    ``scheduler_end_step=None`` means ``num_steps`` (the published default, 30, for 30 steps).
    ``kv_cache=False`` runs without the per-layer key/value cache (the computed tokens then attend
    only to each other; not the published method). ``pixels_per_token``: latent pixels per token
    (``p * p``; 4 for FLUX and SD3), the token's channels being ``C * p * p``, channel-major
    (FLUX's packing). Every value is checked on construction (``TypeError`` / ``ValueError``).
    """

    num_steps: int = 30
    sample_ratio: float = 0.5
    scheduler_start_step: int = 4
    scheduler_end_step: int | None = None
    error_reset_steps: tuple[int, ...] = (12, 22)
    metric: str = "std"
    starvation_scale: float = 0.1
    high_ratio: float = 1.0
    skip_num_step: int = 0
    skip_num_step_length: int = 0
    kv_cache: bool = True
    pixels_per_token: int = 4
    backend: str = "auto"

    def __post_init__(self):
        n = _int("num_steps", self.num_steps, 1)
        r = _float("sample_ratio", self.sample_ratio)
        if not 0.0 < r <= 1.0:
            raise ValueError(f"RASConfig.sample_ratio must be in (0, 1], got {r}")
        start = _int("scheduler_start_step", self.scheduler_start_step, 1)
        end = n if self.scheduler_end_step is None else _int("scheduler_end_step", self.scheduler_end_step)
        if end <= start:
            raise ValueError(f"RASConfig.scheduler_end_step ({end}) must be > scheduler_start_step ({start})")
        resets = self.error_reset_steps
        if isinstance(resets, (str, bytes)) or not hasattr(resets, "__iter__"):
            raise TypeError(f"RASConfig.error_reset_steps must be a sequence of ints, got {type(resets).__name__}")
        resets = tuple(_int("error_reset_steps[]", s, 0) for s in resets)
        bad = [s for s in resets if s >= n]
        if bad:
            raise ValueError(f"RASConfig.error_reset_steps {bad} are not steps of a {n}-step run (0 .. {n - 1})")
        if len(set(resets)) != len(resets):
            raise ValueError(f"RASConfig.error_reset_steps has duplicates: {resets}")
        if self.metric not in _METRICS:
            raise ValueError(f"RASConfig.metric must be one of {_METRICS}, got {self.metric!r}")
        _float("starvation_scale", self.starvation_scale)
        h = _float("high_ratio", self.high_ratio)
        if not 0.0 <= h <= 1.0:
            raise ValueError(f"RASConfig.high_ratio must be in [0, 1], got {h}")
        _int("skip_num_step", self.skip_num_step)
        _int("skip_num_step_length", self.skip_num_step_length, 0)
        if not isinstance(self.kv_cache, bool):
            raise TypeError(f"RASConfig.kv_cache must be a bool, got {type(self.kv_cache).__name__}")
        _int("pixels_per_token", self.pixels_per_token, 1)
        if not isinstance(self.backend, str):
            raise TypeError(f"RASConfig.backend must be a str, got {type(self.backend).__name__}")
        object.__setattr__(self, "error_reset_steps", resets)
        object.__setattr__(self, "sample_ratio", r)
        object.__setattr__(self, "high_ratio", h)
        object.__setattr__(self, "starvation_scale", float(self.starvation_scale))

    @property
    def end_step(self) -> int:
        return self.num_steps if self.scheduler_end_step is None else self.scheduler_end_step

    @property
    def name(self) -> str:
        return f"RAS {self.sample_ratio:g}"

    def replace(self, **changes) -> "RASConfig":
        return dataclasses.replace(self, **changes)

    def with_call_steps(self, sigmas=None, num_inference_steps=None) -> "RASConfig":
        """This config with the step count a pipeline call chose: ``len(sigmas)`` when given, else an
        explicit ``num_inference_steps``, else its own ``num_steps``."""
        if sigmas is not None:
            return self.replace(num_steps=len(sigmas))
        if num_inference_steps is not None:
            return self.replace(num_steps=int(num_inference_steps))
        return self

    @classmethod
    def coerce(cls, ras) -> "RASConfig | None":
        """``None`` -> ``None``; a :class:`RASConfig` as is; a dict -> ``RASConfig(**dict)``; else ``TypeError``."""
        if ras is None or isinstance(ras, cls):
            return ras
        if isinstance(ras, dict):
            return cls(**ras)
        raise TypeError(f"ras must be None, a RASConfig or a dict of its fields, got {type(ras).__name__}")

    def is_ras_step(self, s: int) -> bool:
        """Step ``s`` runs on a token subset (the published ``is_RAS_step``)."""
        return (self.sample_ratio < 1.0 and self.scheduler_start_step <= s <= self.end_step
                and s not in self.error_reset_steps and s < self.num_steps)

    def selects_after(self, s: int) -> bool:
        """After step ``s`` a fresh selection is made for step ``s + 1`` (the published ``is_next_RAS_step``)."""
        t = s + 1
        return (self.sample_ratio < 1.0 and self.scheduler_start_step <= t < self.end_step
                and t not in self.error_reset_steps and t < self.num_steps)

    def token_counts(self, num_tokens: int) -> list[int]:
        """Tokens the transformer computes at every step (per sample) on a grid of ``num_tokens``."""
        skips = skip_counts(self, num_tokens)
        out, last = [], None
        for s in range(self.num_steps):
            if s > 0 and self.selects_after(s - 1):
                last = skips[s]
            if self.is_ras_step(s) and last is not None:
                _, high, low = _split(last, self.high_ratio)
                out.append(num_tokens - high - low)
            else:
                out.append(num_tokens)
        return out


def skip_counts(config: RASConfig, num_tokens: int, grid: tuple[int, int] | None = None) -> list[int]:
    """The published per-step drop counts (``docs/ras.md`` section 2) for ``num_tokens = H_tok * W_tok``.

    ``grid=(H_tok, W_tok)`` evaluates the average in the published order ``((1 - r) * H_tok) * W_tok``;
    without it ``(1 - r) * num_tokens``. ``ValueError`` if an entry leaves ``[0, num_tokens]``.
    """
    h, w = grid if grid is not None else (num_tokens, 1)
    avg = int((1 - config.sample_ratio) * h * w)
    n, start, length = config.num_steps, config.scheduler_start_step, config.skip_num_step_length
    if length == 0:
        out = [avg] * n
    else:
        centre = ((n + start) // length) // 2
        out = [(avg + config.skip_num_step * (s // length - centre)) // 64 * 64 for s in range(n)]
    for s in list(range(min(start, n))) + list(config.error_reset_steps):
        out[s] = 0
    bad = [(s, c) for s, c in enumerate(out) if not 0 <= c <= num_tokens]
    if bad:
        raise ValueError(f"RAS drop counts must lie in [0, {num_tokens}] on a grid of {num_tokens} tokens; "
                         f"(step, count) {bad[:4]} do not (skip_num_step={config.skip_num_step}, "
                         f"skip_num_step_length={length})")
    return out


def _split(skip: int, high_ratio: float) -> tuple[int, int, int]:
    """``(skip, high, low)``: the published ``high_bar`` / ``low_bar`` of a drop count."""
    return skip, int(skip * high_ratio), int(skip * (1 - high_ratio))


class RASKVCache:
    """Per-call key/value caches of every attention layer, for all image tokens of a RAS run.

    The sampler sets the mode of every step (:meth:`refresh`, :meth:`sparse`, :meth:`off`); a
    velocity sets, before each transformer forward, which cache rows and which branch that
    forward is (:meth:`select_rows`). Attention processors read :attr:`mode`, :attr:`idx`
    (the computed tokens of the rows of this forward, ``[b, M]``), and store / read the
    ``[B_rows, N, D]`` caches with :meth:`store` / :meth:`fill`.
    """

    def __init__(self, num_tokens: int, backend: str = "auto"):
        self.num_tokens = int(num_tokens)
        self.backend = backend
        self.mode = "off"
        self.step_idx: torch.Tensor | None = None  # [B, M] of the step (sparse mode)
        self.idx: torch.Tensor | None = None  # [b, M] of the current forward
        self.rows = slice(None)
        self.total_rows = 0
        self.branch = None
        self._caches: dict = {}
        self.layers_filled = 0  # sparse-mode layer calls (tests: every layer read its cache)

    # -- the sampler's side
    def refresh(self) -> None:
        self.mode, self.step_idx, self.idx = "refresh", None, None

    def sparse(self, idx: torch.Tensor) -> None:
        self.mode, self.step_idx = "sparse", idx

    def off(self) -> None:
        self.mode, self.step_idx, self.idx = "off", None, None

    def clear(self) -> None:
        self._caches.clear()

    # -- the velocity's side
    def select_rows(self, rows: slice, total_rows: int, branch, idx: torch.Tensor | None) -> None:
        """The forward about to run covers rows ``rows`` (of ``total_rows``) of the caches of ``branch``, with
        computed tokens ``idx`` (``[b, M]``; ``None`` on a dense forward)."""
        self.rows, self.total_rows, self.branch, self.idx = rows, int(total_rows), branch, idx

    @property
    def active(self) -> bool:
        return self.mode != "off"

    # -- the processor's side
    def store(self, layer, name: str, full: torch.Tensor) -> None:
        """A dense forward: ``full [b, N, D]`` becomes rows ``self.rows`` of the layer's cache."""
        key = (id(layer), name, self.branch)
        cache = self._caches.get(key)
        total_rows = self.total_rows
        if (cache is None or cache.shape[0] != total_rows or cache.shape[2] != full.shape[2]
                or cache.dtype != full.dtype):
            cache = full.new_zeros(total_rows, full.shape[1], full.shape[2])
            self._caches[key] = cache
        cache[self.rows] = full

    def fill(self, layer, name: str, computed: torch.Tensor) -> torch.Tensor:
        """A sparse forward: write ``computed [b, M, D]`` into rows ``idx`` of the cache; returns the full
        ``[b, N, D]``."""
        key = (id(layer), name, self.branch)
        cache = self._caches.get(key)
        if cache is None:
            raise RuntimeError("RASKVCache: a sparse step before any dense step stored this layer's keys/values "
                               f"(layer {type(layer).__name__}, {name}, branch {self.branch!r})")
        part = cache[self.rows]
        jk.scatter_tokens_(part, self.idx, computed.to(cache.dtype), backend=self.backend, validate=False)
        self.layers_filled += 1
        return part


@dataclass
class RASReport(JiTReport):
    """A :class:`~jit_sampler.JiTReport` of a RAS run, plus the steps' kinds and the drop counts used.

    ``active_tokens``: tokens computed per step (per sample); ``ras_steps``: whether each step ran
    sparse; ``skip_counts``: the published drop-count list of the run.
    """

    ras_steps: list[bool] = field(default_factory=list)
    skip_counts: list[int] = field(default_factory=list)

    def summary(self) -> str:
        head = (f"RAS[{getattr(self.config, 'name', 'custom')}] grid {self.height}x{self.width}, batch "
                f"{self.batch_size}, {self.steps} steps ({sum(self.ras_steps)} sparse), {self.model_calls} model "
                f"calls, {self.full_step_equivalents:.2f} full-step equivalents")
        rest = super().summary().split("\n", 1)
        return head + ("\n" + rest[1] if len(rest) > 1 else "")


def _score(diff: torch.Tensor, channels: int, patch: int, metric: str) -> torch.Tensor:
    """Per-token score ``[B, N]`` of the update ``diff [B, N, C * p * p]`` (``docs/ras.md`` section 4)."""
    b, n, _ = diff.shape
    d = diff.view(b, n, channels, patch, patch)
    per_pixel = torch.std(d, dim=2) if metric == "std" else torch.norm(d, p=2, dim=2)
    return per_pixel.mean(-1).mean(-1)


def _select(diff: torch.Tensor, drops: torch.Tensor, skip: int, config: RASConfig, channels: int,
            patch: int) -> torch.Tensor:
    """The computed tokens ``[B, M]`` (sorted) of the next step from this step's update ``diff`` (``docs/ras.md``
    section 4); the dropped tokens' counts in ``drops [B, N]`` grow by 1."""
    n = diff.shape[1]
    score = _score(diff, channels, patch, config.metric)
    score = score * torch.exp(config.starvation_scale * drops)
    order = torch.sort(score, dim=1, descending=False).indices
    _, high, low = _split(skip, config.high_ratio)
    dropped = torch.cat([order[:, :low], order[:, n - high:]], dim=1)
    drops.scatter_add_(1, dropped, torch.ones_like(dropped, dtype=drops.dtype))
    return order[:, low:n - high].sort(dim=1).values.contiguous()


@torch.no_grad()
def ras_sample(velocity_fn, latents: torch.Tensor, height: int, width: int, sigmas: Sequence[float],
               config: RASConfig | None = None, *, step_callback=None, interrupt=None):
    """Integrate ``latents [B, N, C]`` (``N = height * width`` tokens) along ``sigmas`` with RAS.

    ``sigmas``: ``config.num_steps + 1`` floats (non-increasing, in [0, 1]). ``velocity_fn`` as in
    the module docstring. ``step_callback(i, sigma, y) -> y | None`` runs after each Euler step (a
    returned tensor replaces the latent); ``interrupt() -> bool`` skips the remaining steps.
    Returns ``(y, RASReport)`` with ``y`` in ``latents.dtype``. Bad arguments raise before any
    model call.
    """
    config = RASConfig() if config is None else config
    if not isinstance(config, RASConfig):
        raise TypeError(f"config must be a RASConfig, got {type(config).__name__}")
    height, width = check_int("height", height, kind="index"), check_int("width", width, kind="index")
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise TypeError("latents must be a floating-point tensor")
    n = height * width
    if latents.dim() != 3 or latents.shape[1] != n or latents.shape[0] < 1:
        raise ValueError(f"latents must be [B >= 1, {n}, C], got {tuple(latents.shape)}")
    pp = config.pixels_per_token
    patch = math.isqrt(pp)
    if patch * patch != pp or latents.shape[2] % pp:
        raise ValueError(f"pixels_per_token ({pp}) must be a square dividing the token width {latents.shape[2]}")
    sig = check_sigmas(sigmas, config.num_steps)
    skips = skip_counts(config, n, (height, width))
    channels = latents.shape[2] // pp
    steps = config.num_steps
    b = latents.shape[0]
    device = latents.device

    y = latents.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    all_idx = torch.arange(n, device=device)
    kv = RASKVCache(n, config.backend) if config.kv_cache else None
    needs_kv = [any(config.is_ras_step(t) for t in range(s + 1, steps)) for s in range(steps)]
    drops = torch.full((b, n), -float(len(sig)), device=device)  # the published offset: -(steps + 1)
    sig32 = torch.tensor(sig, dtype=torch.float32)
    idx = v_cache = None
    report = RASReport(config=config, height=height, width=width, batch_size=b, sigmas=list(sig),
                       skip_counts=skips)
    calls0 = getattr(velocity_fn, "calls", None)
    t_start = time.perf_counter()
    t_model = 0.0

    def call(x, active, i):
        nonlocal t_model
        t0 = time.perf_counter()
        out = velocity_fn(x, active, sig[i], i, kv=kv) if kv is not None else velocity_fn(x, active, sig[i], i)
        t_model += time.perf_counter() - t0
        return out

    for i in range(steps):
        if interrupt is not None and interrupt():
            break
        sparse = config.is_ras_step(i) and idx is not None and idx.shape[1] < n
        if sparse:
            if kv is not None:
                kv.sparse(idx)
            v_act = call(jk.gather_tokens(y, idx, backend=config.backend, validate=False), idx, i).to(torch.float32)
            v = jk.scatter_tokens(v_cache, idx, v_act, backend=config.backend, validate=False)
            report.active_tokens.append(int(idx.shape[1]))
        else:
            if kv is not None:
                kv.refresh() if needs_kv[i] else kv.off()
                if not needs_kv[i]:
                    kv.clear()
            v = call(y, all_idx, i).to(torch.float32)
            report.active_tokens.append(n)
        report.ras_steps.append(sparse)
        report.stage_of_step.append(int(sparse))
        diff = (sig32[i + 1] - sig32[i]) * v
        y = y + diff
        if config.selects_after(i):
            idx = _select(diff, drops, skips[i + 1], config, channels, patch)
            v_cache = v
        if step_callback is not None:
            new = step_callback(i, sig[i], y)
            if new is not None:
                if not isinstance(new, torch.Tensor) or new.shape != y.shape:
                    raise ValueError(f"step_callback must return None or a tensor of shape {tuple(y.shape)}")
                y = new.to(torch.float32)
    if kv is not None:
        kv.off()
        kv.clear()
    report.time_total_s = time.perf_counter() - t_start
    report.time_model_s = t_model
    report.time_sampler_s = report.time_total_s - t_model
    report.model_evals = len(report.active_tokens)
    calls = getattr(velocity_fn, "calls", None)
    report.model_calls = (calls - calls0 if isinstance(calls, int) and isinstance(calls0, int)
                          else len(report.active_tokens))
    return y.to(latents.dtype), report


class RASFinalStage:
    """RAS inside JiT's final (dense) stage: a ``velocity_fn`` wrapper for :func:`~jit_sampler.jit_sample`.

    ``RASFinalStage(velocity_fn, ras, jit_config, sigmas, height, width)`` passes every step of
    JiT's sparse stages through to ``velocity_fn`` unchanged. On the final stage's ``S`` steps it
    runs RAS as :func:`ras_sample` does, with ``ras``'s selection settings (``sample_ratio``,
    ``metric``, ``starvation_scale``, ``high_ratio``, ``kv_cache``, ``pixels_per_token``) and a
    schedule re-based on the stage: its first step dense (it stores every layer's keys and values),
    every later step a RAS step (``scheduler_start_step=1``, ``error_reset_steps`` those of ``ras``
    that are stage-relative step numbers below ``S``). The JiT loop keeps the Euler update; the
    wrapper returns the full velocity with the dropped tokens' cached values. ``active_tokens``:
    the tokens actually computed per step of the run (use it for FLOPs; the JiT report counts
    every final-stage step as dense). ``velocity_fn`` takes ``kv=`` when ``ras.kv_cache``.
    """

    def __init__(self, velocity_fn, ras: RASConfig, jit_config, sigmas: Sequence[float], height: int, width: int):
        from .sampler import make_plan

        if not isinstance(ras, RASConfig):
            raise TypeError(f"ras must be a RASConfig, got {type(ras).__name__}")
        plan = make_plan(jit_config, height, width, sigmas)
        last = plan.stage_of_step[-1]
        self.first = plan.stage_of_step.index(last)
        stage_steps = plan.steps - self.first
        if plan.token_counts[last] != plan.num_tokens:
            raise ValueError("the JiT config's final stage is not dense")
        if stage_steps < 2:
            raise ValueError(f"RAS in JiT's final stage needs at least 2 steps in it, the config has {stage_steps}")
        resets = tuple(s for s in ras.error_reset_steps if 0 < s < stage_steps)
        self.config = ras.replace(num_steps=stage_steps, scheduler_start_step=1, scheduler_end_step=None,
                                  error_reset_steps=resets)
        self.velocity_fn = velocity_fn
        self.n = plan.num_tokens
        self.height, self.width = plan.height, plan.width
        self.sig32 = torch.tensor(plan.sigmas, dtype=torch.float32)
        self.skips = skip_counts(self.config, self.n, (self.height, self.width))
        self.active_tokens: list[int] = []
        self.kv = RASKVCache(self.n, ras.backend) if ras.kv_cache else None
        self._drops = self._idx = self._v_cache = None
        self.calls0 = getattr(velocity_fn, "calls", None)

    @property
    def calls(self):
        return getattr(self.velocity_fn, "calls", None)

    def _call(self, x, idx, sigma, step):
        if self.kv is None:
            return self.velocity_fn(x, idx, sigma, step)
        return self.velocity_fn(x, idx, sigma, step, kv=self.kv)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, active_idx: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        if step < self.first or x.shape[1] != self.n:
            self.active_tokens.append(int(active_idx.shape[-1]))
            return self.velocity_fn(x, active_idx, sigma, step)
        cfg, k = self.config, step - self.first
        pp = cfg.pixels_per_token
        patch = math.isqrt(pp)
        if patch * patch != pp or x.shape[2] % pp:
            raise ValueError(f"pixels_per_token ({pp}) must be a square dividing the token width {x.shape[2]}")
        y = x.to(torch.float32)
        if k == 0:
            self._drops = torch.full((x.shape[0], self.n), -float(cfg.num_steps + 1), device=x.device)
            self._idx = self._v_cache = None
        sparse = cfg.is_ras_step(k) and self._idx is not None and self._idx.shape[1] < self.n
        if sparse:
            if self.kv is not None:
                self.kv.sparse(self._idx)
            part = self._call(jk.gather_tokens(y, self._idx, backend=cfg.backend, validate=False), self._idx, sigma, step)
            v = jk.scatter_tokens(self._v_cache, self._idx, part.to(torch.float32), backend=cfg.backend, validate=False)
            self.active_tokens.append(int(self._idx.shape[1]))
        else:
            later = any(cfg.is_ras_step(t) for t in range(k + 1, cfg.num_steps))
            if self.kv is not None:
                self.kv.refresh() if later else self.kv.off()
                if not later:
                    self.kv.clear()
            v = self._call(x, active_idx, sigma, step).to(torch.float32)
            self.active_tokens.append(self.n)
        if cfg.selects_after(k):
            diff = (self.sig32[step + 1] - self.sig32[step]) * v
            self._idx = _select(diff, self._drops, self.skips[k + 1], cfg, x.shape[2] // pp, patch)
            self._v_cache = v
        if k == cfg.num_steps - 1 and self.kv is not None:
            self.kv.off()
            self.kv.clear()
        return v.to(x.dtype)
