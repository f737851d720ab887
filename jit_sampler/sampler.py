"""The model-agnostic JiT loop on packed latents (docs/method.md sections 2-5).

The loop only needs a velocity callable

    velocity_fn(x_active [B, M, C], active_idx [M] | [B, M], sigma: float, step: int) -> v [B, M, C]

that runs the model on the active tokens (each with its own position), the full latent
``[B, N, C]`` of an ``H x W`` token grid, the ``steps + 1`` sigmas and a :class:`JiTConfig`.
Everything model-specific (text conditioning, guidance, CFG, position ids, per-sample
calls) lives in the callable, so FLUX.1, FLUX.2-klein and the tiny model share this loop.

Order inside step ``i`` (docs/method.md section 5):

1. at the first step of a new stage: ITA from the cached lifted ``v_prev`` -> DMF target
   from the cached ``y_prev``, ``v_prev`` and the OLD anchors -> update ``y_R`` -> enlarge the
   active set (and compute its nearest-anchor map, once per stage);
2. the model on the active set at ``sigma_i``;
3. lift + Euler to ``sigma_{i+1}`` on the full latent (fused ``lift_euler_``), except on the
   last step of a stage, where the lifted field is materialised because the next step's
   ITA and DMF need it.

The working latent is kept in float32 whatever the model dtype (the ops compute in fp32
anyway, and rounding the full latent to bf16 every step is what a scheduler avoids too).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

import jit_kernels as jk

from .anchors import activate_tokens, initial_anchors, merge_active
from .config import JiTConfig
from .report import JiTReport
from .scalar_checks import check_int, check_sigmas

__all__ = ["VelocityFn", "JiTPlan", "make_plan", "jit_sample", "draw_normal"]

class VelocityFn(Protocol):
    """What :func:`jit_sample` calls once per step: the model's velocity on the active tokens.

    ``velocity_fn(x, active_idx, sigma, step) -> v`` with

    - ``x [B, M, C]``: the active tokens of the working latent (float32), gathered in the
      order of ``active_idx``;
    - ``active_idx``: int64 ``[M]`` (one set for the batch) or ``[B, M]`` (one per sample,
      ``anchor_policy="per_sample"``): the tokens' row-major positions ``row * W + col`` on
      the ``H x W`` grid; the same tensor object is passed for every step of a stage, so an
      implementation may cache per-stage work (position ids) keyed on it;
    - ``sigma``: the current noise level (Python float), ``step``: the step index;
    - returns ``v [B, M, C]`` (any floating dtype; rectified flow: ``eps - x0``).

    The callable owns everything model-specific: conditioning, guidance, CFG, position ids.
    A plain function with this signature works; :class:`~jit_sampler.FluxVelocity` is the
    implementation for diffusers' FLUX transformers.
    """

    def __call__(self, x: torch.Tensor, active_idx: torch.Tensor, sigma: float, step: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class JiTPlan:
    """The static layout of a run: everything that depends only on the config and the grid.

    ``token_counts[k]`` active tokens in stage ``k`` (sparsest first, last ``N``);
    ``stage_of_step[i]`` the stage of step ``i``; ``sigmas`` the ``steps + 1`` sigmas. Stages
    are those that run (``JiTConfig.effective_stages``: a run of fewer steps than configured
    stages drops the sparsest ones), so every stage has at least one step.
    """

    height: int
    width: int
    token_counts: tuple[int, ...]
    stage_of_step: tuple[int, ...]
    sigmas: tuple[float, ...]

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def steps(self) -> int:
        return len(self.stage_of_step)

    @property
    def active_tokens(self) -> list[int]:
        """Active tokens at every step (per sample)."""
        return [self.token_counts[s] for s in self.stage_of_step]

    def is_transition(self, i: int) -> bool:
        """Whether step ``i`` starts a new stage (never step 0)."""
        return 0 < i < self.steps and self.stage_of_step[i] != self.stage_of_step[i - 1]


def make_plan(config: JiTConfig, height: int, width: int, sigmas: Sequence[float]) -> JiTPlan:
    """Check ``sigmas`` (``total_steps + 1`` floats, non-increasing, in [0, 1]) and lay out the stages.

    Raises ``TypeError`` for a ``config`` that is not a :class:`JiTConfig`, a non-integer
    ``height`` / ``width`` or non-numeric ``sigmas``; ``ValueError`` for a grid under 1 x 1 or
    sigmas of the wrong length, non-finite, outside [0, 1] or increasing.
    """
    if not isinstance(config, JiTConfig):
        raise TypeError(f"config must be a JiTConfig, got {type(config).__name__}")
    height, width = check_int("height", height, kind="index"), check_int("width", width, kind="index")
    sig = check_sigmas(sigmas, config.total_steps)
    return JiTPlan(height, width, tuple(config.token_counts(height * width)), config.layout().stage_of_step, sig)


def draw_normal(shape: Sequence[int], generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal ``shape`` (``[B, ...]``) from ``generator``: one generator for all, or a list of ``B``.

    Drawn on the generator's device (so a CPU generator gives the same numbers for any
    target device) and then moved, like diffusers' ``randn_tensor``.
    """
    if isinstance(generator, (list, tuple)):
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generator]
        out = torch.cat(parts)
    else:
        gdev = generator.device if generator is not None else torch.device("cpu")
        out = torch.randn(tuple(shape), generator=generator, device=gdev, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


class _ModelTimer:
    """Time spent inside the velocity callable, without a host sync per call on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.seconds = 0.0

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, token):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append((token, e))
        else:
            self.seconds += time.perf_counter() - token

    def total(self) -> float:
        if self.cuda and self.events:
            torch.cuda.synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1e3
            self.events.clear()
        return self.seconds


def _check_generator(generator, batch: int) -> None:
    """``None``, one ``torch.Generator`` or a list / tuple of ``batch`` of them."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if bad:
            raise TypeError(f"generator: a list must hold torch.Generator objects only, got {bad[0]}")
        if len(generator) != batch:
            raise ValueError(f"a list of generators needs one per sample ({batch}), got {len(generator)}")
        return
    raise TypeError(f"generator must be a torch.Generator, a list of one per sample or None, "
                    f"got {type(generator).__name__}")


def _check_dmf_noise(config: JiTConfig, batch: int, num_tokens: int, channels: int) -> None:
    """A ``JiTConfig.dmf_noise`` tensor must be ``[B or 1, N, C]`` (its dtype is checked by the config)."""
    src = config.dmf_noise
    if isinstance(src, torch.Tensor) and (tuple(src.shape[1:]) != (num_tokens, channels) or src.shape[0] not in (1, batch)):
        raise ValueError(f"JiTConfig.dmf_noise: tensor must be [B, N, C] = {(batch, num_tokens, channels)} "
                         f"(or batch 1), got {tuple(src.shape)}")


def _check_velocity(v, x: torch.Tensor, step: int) -> None:
    """What ``velocity_fn`` returned at ``step`` for the active tokens ``x``: metadata only, no host sync."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"velocity_fn must return a tensor v [B, M, C] = {list(x.shape)}, got "
                        f"{type(v).__name__} at step {step}")
    if not v.is_floating_point():
        raise TypeError(f"velocity_fn must return a floating-point tensor, got {v.dtype} at step {step}")
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn returned {tuple(v.shape)}, expected {tuple(x.shape)}")
    if v.device != x.device:
        raise ValueError(f"velocity_fn returned a tensor on {v.device}, expected the latents' device {x.device} "
                         f"(step {step})")


def _check_callback_result(out, y: torch.Tensor, step: int) -> None:
    """A tensor returned by ``step_callback`` replaces the latent: exactly its shape and device, floating."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"step_callback must return None or a tensor [B, N, C] = {list(y.shape)}, got "
                        f"{type(out).__name__} at step {step}")
    if not out.is_floating_point():
        raise TypeError(f"step_callback returned a {out.dtype} tensor at step {step}; the latent is floating-point")
    if out.shape != y.shape:
        raise ValueError(f"step_callback returned shape {tuple(out.shape)} at step {step}; a replacement latent "
                         f"must have exactly the latent's shape {tuple(y.shape)} (no broadcasting)")
    if out.device != y.device:
        raise ValueError(f"step_callback returned a tensor on {out.device} at step {step}; the latent is on {y.device}")


def _dmf_noise(config: JiTConfig, new: torch.Tensor, y: torch.Tensor, fields: dict, generator) -> torch.Tensor:
    """``eps [B, R, C]`` of the newly activated tokens ``new`` (``[R]`` or ``[B, R]``): their rows of a
    ``[B, N, C]`` noise field, so a token's noise depends on its position only, never on its rank in
    the importance order or on which other tokens join with it (docs/method.md section 9).

    ``fields`` holds the run's fields: ``"initial"`` (the initial latent noise) when that mode is
    on, and the ``"independent"`` field, drawn from ``generator`` at the first transition that
    needs it and read again by later transitions (as the reference reads its one draw)."""
    b, n, c = y.shape
    if isinstance(config.dmf_noise, torch.Tensor):  # shape checked by _check_dmf_noise before the loop
        src = config.dmf_noise.to(device=y.device, dtype=y.dtype).expand(b, -1, -1)
        return jk.gather_tokens(src, new, backend=config.backend, validate=False)  # new: the sampler's own
    if config.dmf_noise not in fields:  # "independent": one draw per run, every position
        fields[config.dmf_noise] = draw_normal((b, n, c), generator, y.device, y.dtype)
    return jk.gather_tokens(fields[config.dmf_noise], new, backend=config.backend, validate=False)


def _initial_active(config: JiTConfig, plan: JiTPlan, b: int, generator, device) -> torch.Tensor:
    """The first stage's active list: ``config.init_anchors`` (checked) or a fitted draw."""
    h, w = plan.height, plan.width
    n, m0 = h * w, plan.token_counts[0]
    per_sample = config.anchor_policy == "per_sample"
    given = config.init_anchors
    if given is not None:
        want = (b, m0) if per_sample else (m0,)
        if tuple(given.shape) != want:
            dropped = config.effective_stages[0]
            note = (f"; {config.total_steps} step(s) drop the {dropped} sparsest stage(s), so the first stage "
                    f"that runs is configured stage {dropped}") if dropped else ""
            raise ValueError(f"JiTConfig.init_anchors: must be {list(want)} (the first stage's budget of "
                             f"{m0} tokens{' per sample' if per_sample else ''}{note}), got {tuple(given.shape)}")
        # The one index tensor the sampler did not build: checked here, once; every op after this takes
        # the trusted path (validate=False) for the index tensors of the run.
        jk.validate_index("jit_sample", "JiTConfig.init_anchors", given, n, unique=True)
    if m0 == n:
        return _dense_active(n, b, per_sample, device)
    if given is not None:
        active = given.to(device)
        # A tensor of the sampler's own either way (the user's may be written later, or be an inference tensor).
        return active.clone() if config.anchor_order == "insertion" else active.sort(dim=-1).values
    return initial_anchors(h, w, m0, grid=config.init_grid, batch_size=b if per_sample else None,
                           generator=generator, device=device, order=config.anchor_order)


@contextlib.contextmanager
def _outside_inference_mode():
    """Build tensors outside a caller's ``torch.inference_mode`` (gradients stay off), so that they have a
    version counter (inference tensors have none)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _check_active_unchanged(active: torch.Tensor, version: int, step: int) -> None:
    """The velocity callable must not write the active-index tensor it was handed: the sampler's ops trust
    its values (validate=False), so a write would go unchecked. Detected by its version counter."""
    if active._version != version:
        raise RuntimeError(f"velocity_fn wrote the active-index tensor (its second argument) in place at step "
                           f"{step}; it is the sampler's own index list and must be treated as read-only "
                           "(clone it to modify a copy)")


def _dense_active(n: int, b: int, per_sample: bool, device) -> torch.Tensor:
    """The dense stage's list: every token in row-major order (whatever ``anchor_order``)."""
    active = torch.arange(n, device=device)
    return active.expand(b, n).contiguous() if per_sample else active


@torch.no_grad()
def jit_sample(
    velocity_fn: VelocityFn,
    latents: torch.Tensor,
    height: int,
    width: int,
    sigmas: Sequence[float],
    config: JiTConfig,
    generator=None,
    *,
    step_callback: Callable[[int, float, torch.Tensor], torch.Tensor | None] | None = None,
    interrupt: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, JiTReport]:
    """Integrate ``latents [B, N, C]`` (``N = height * width``, at ``sigmas[0]``) to ``sigmas[-1]`` with JiT.

    Args:
        velocity_fn: the model on active tokens (see the module docstring). If it has an
            int attribute ``calls`` (transformer forwards so far), the report counts those.
            It must return a floating-point tensor of exactly ``x``'s shape on ``x``'s device.
        latents: the initial latent, packed ``[B, N, C]``, floating point, ``C >= 1``; not
            modified. An empty batch (``B = 0``) returns an empty ``[0, N, C]`` result at once,
            without calling ``velocity_fn`` (the report has no steps, like a run interrupted
            before step 0).
        height, width: the token grid (ints ``>= 1``).
        sigmas: ``config.total_steps + 1`` finite, non-increasing floats in [0, 1].
        config: the :class:`JiTConfig`.
        generator: ``torch.Generator``, a list of ``B`` generators, or ``None`` (global RNG);
            every draw (anchor fit, DMF noise) comes from it.
        step_callback: called after each step as ``(i, sigma_i, y [B, N, C] in the latent
            dtype)``; ``y`` is a copy the callback may keep. A returned tensor replaces the
            latent: it must be floating point with exactly ``y``'s shape (no broadcasting) and
            device; ``None`` keeps it.
        interrupt: checked before each step; ``True`` stops the loop.

    Returns:
        ``(y [B, N, C] in latents.dtype at sigmas[-1], JiTReport)``.

    Raises:
        TypeError: ``velocity_fn`` / ``step_callback`` / ``interrupt`` not callable, ``latents``
            not a floating-point tensor, ``config`` not a :class:`JiTConfig`, a non-integer
            ``height`` / ``width``, non-numeric ``sigmas``, a ``generator`` that is not a
            ``torch.Generator`` (or a list of them); during the run, a ``velocity_fn`` or
            ``step_callback`` result that is not a floating-point tensor.
        ValueError: a latent that is not ``[B, N, C]`` with ``N = height * width`` and
            ``C >= 1``, bad ``sigmas`` (length, non-finite, outside [0, 1], increasing), a list
            of generators of the wrong length, a ``JiTConfig.dmf_noise`` tensor of the wrong
            shape; during the run, a ``velocity_fn`` or ``step_callback`` result of the wrong
            shape or device. Everything but the results is checked before the first model call.
    """
    # Everything is checked before the first model call (and before any other work).
    if not callable(velocity_fn):
        raise TypeError(f"velocity_fn must be callable, got {type(velocity_fn).__name__}")
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor [B, N, C], got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor, got {latents.dtype}")
    if latents.dim() != 3:
        raise ValueError(f"latents must be packed [B, N, C], got shape {tuple(latents.shape)}")
    for name, fn in (("step_callback", step_callback), ("interrupt", interrupt)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    b, n, c = latents.shape
    plan = make_plan(config, height, width, sigmas)
    height, width = plan.height, plan.width
    if n != height * width:
        raise ValueError(f"latents have {n} tokens but the grid is {height} x {width} = {height * width}")
    if c == 0:
        raise ValueError(f"latents have no channels (shape {tuple(latents.shape)}); C must be >= 1")
    _check_generator(generator, b)
    _check_dmf_noise(config, b, n, c)
    be = config.backend
    device, out_dtype = latents.device, latents.dtype
    per_sample = config.anchor_policy == "per_sample"
    calls0 = getattr(velocity_fn, "calls", None)
    report = JiTReport(config=config, height=height, width=width, batch_size=b, sigmas=list(plan.sigmas),
                       stage_of_step=list(plan.stage_of_step))
    if b == 0:  # an empty batch: nothing to integrate, no model call (like a run interrupted before step 0)
        return latents.to(out_dtype, memory_format=torch.contiguous_format, copy=True), report
    timer = _ModelTimer(device)
    t_start = time.perf_counter()

    y = latents.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # inputs may be strided views
    initial = isinstance(config.dmf_noise, str) and config.dmf_noise == "initial"
    noise_fields = {"initial": y.clone()} if initial else {}  # DMF noise per position (_dmf_noise)

    # The run's index tensors (active list, nearest map) are built by the sampler (or checked once, for
    # init_anchors), so every op takes the trusted path: no value check, no host sync per step. They
    # are built outside a caller's inference mode so that they have a version counter: a velocity_fn
    # that writes the active list in place is caught (_check_active_unchanged).
    with _outside_inference_mode():
        active = _initial_active(config, plan, b, generator, device)
        nearest = (jk.nearest_anchor_map(active, height, width, backend=be, validate=False)
                   if active.shape[-1] < n else None)
    y_prev = v_prev = None
    sig = plan.sigmas

    for i in range(plan.steps):
        if interrupt is not None and interrupt():
            break
        stage = plan.stage_of_step[i]
        if plan.is_transition(i):
            count = plan.token_counts[stage] - active.shape[-1]
            if count > 0:
                # ITA from the cached lifted velocity of step i-1 (no extra model call).
                with _outside_inference_mode():
                    new = activate_tokens(v_prev, active, count, height, width, ita=config.ita, nearest=nearest,
                                          backend=be, validate=False)
                # DMF: target from y_prev, v_prev and the OLD anchors (their nearest map).
                eps = _dmf_noise(config, new, y, noise_fields, generator)
                target = jk.microflow_target(y_prev, v_prev, active, new, eps, sig[i - 1], sig[i], height, width,
                                             nearest=nearest, blur_scale=config.blur_scale, backend=be, validate=False)
                for w in config.dmf_weights:
                    if w == 1.0:
                        jk.microflow_update_(y, new, target, mode="assign", backend=be, validate=False)
                    else:
                        jk.microflow_update_(y, new, target, mode="blend", weight=w, backend=be, validate=False)
                with _outside_inference_mode():
                    active = merge_active(active, new, order=config.anchor_order)
                    if active.shape[-1] < n:
                        nearest = jk.nearest_anchor_map(active, height, width, backend=be, validate=False)
                    else:
                        active, nearest = _dense_active(n, b, per_sample, device), None
                report.new_tokens[i] = int(count)
            y_prev = v_prev = None  # free the cache
        dense = active.shape[-1] == n
        x_act = y if dense else jk.gather_tokens(y, active, backend=be, validate=False)
        tok = timer.start()
        version = active._version
        v = velocity_fn(x_act, active, sig[i], i)
        timer.stop(tok)
        _check_active_unchanged(active, version, i)
        _check_velocity(v, x_act, i)
        v = v.to(torch.float32)
        if dense and v.data_ptr() == y.data_ptr():
            v = v.clone()  # a callable that returns its input must not alias the in-place update
        dt = sig[i + 1] - sig[i]
        if plan.is_transition(i + 1):
            # The next step's ITA and DMF need the full lifted field: materialise it once.
            v_full = v if dense else jk.lift_field(v, active, height, width, nearest=nearest,
                                                   blur_scale=config.blur_scale, backend=be, validate=False)
            y_prev, v_prev = y.clone(), v_full
            y.add_(v_full, alpha=dt)
        elif dense:
            y.add_(v, alpha=dt)  # stage 0: the lift is the identity
        else:
            jk.lift_euler_(y, v, active, height, width, dt, nearest=nearest, blur_scale=config.blur_scale, backend=be,
                           validate=False)
        report.active_tokens.append(int(active.shape[-1]))
        if step_callback is not None:
            # A copy: the callback may keep it (the working latent is overwritten in place by later steps).
            out = step_callback(i, sig[i], y.to(out_dtype, copy=True))
            if out is not None:
                _check_callback_result(out, y, i)
                y.copy_(out)

    report.model_evals = len(report.active_tokens)
    calls = getattr(velocity_fn, "calls", None)
    report.model_calls = (calls - calls0) if isinstance(calls, int) and isinstance(calls0, int) else report.model_evals
    report.time_model_s = timer.total()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report.time_total_s = time.perf_counter() - t_start
    report.time_sampler_s = max(0.0, report.time_total_s - report.time_model_s)
    return y.to(out_dtype), report
