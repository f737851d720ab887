"""What a JiT run did: model calls, active tokens, time per phase, and transformer FLOPs.

FLOP model of ``FluxTransformer2DModel`` (2 FLOPs per multiply-add, D = heads * head_dim):

- every transformer block (19 double + 38 single for FLUX.1) costs ``12 D^2`` MACs per token
  in its linear layers (FLUX.2's SwiGLU blocks with ``mlp_ratio`` r: ``(4 + 3r) D^2``; its
  shared modulation is counted as FLUX.1's per-block one, an over-estimate that does not
  scale with tokens): double blocks q, k, v, out (4 D^2) + MLP D -> 4D -> D (8 D^2), with
  separate but equal-sized weights for the text stream; single blocks q, k, v (3 D^2) +
  MLP-in D -> 4D (4 D^2) + the fused output projection 5D -> D (5 D^2);
- embedders: ``x_embedder`` (C_in -> D) and ``proj_out`` (D -> C_out) per image token,
  ``context_embedder`` (joint_attention_dim -> D) per text token;
- per sample and call: time / guidance / pooled-text embeddings and the adaLN modulation
  linears (counted in ``modulation``; they do not scale with tokens);
- attention per block: ``QK^T`` and ``AV`` cost ``2 S^2 D`` MACs for a sequence of
  ``S = N_img + N_txt`` tokens.

``image_linear`` alone is the quantity the paper's profiler ratios follow (docs/method.md
section 7): it is exactly linear in the active image tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

__all__ = ["FluxFlops", "flux_transformer_flops", "flux_run_flops", "flop_summary", "JiTReport", "FLUX1_DEV_CONFIG"]

#: The dimensions of FLUX.1-dev's transformer (diffusers config keys).
FLUX1_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True,
)


def _cfg(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass
class FluxFlops:
    """FLOPs of transformer work, split by kind (all in FLOPs, 2 per multiply-add)."""

    image_linear: float = 0.0
    text_linear: float = 0.0
    modulation: float = 0.0
    attention: float = 0.0
    attention_image_only: float = 0.0

    @property
    def linear(self) -> float:
        return self.image_linear + self.text_linear + self.modulation

    @property
    def total(self) -> float:
        """Everything: linear layers of image and text tokens, modulation and joint attention."""
        return self.linear + self.attention

    @property
    def total_image_only(self) -> float:
        """As if there were no text tokens: image linear + modulation + image-only attention."""
        return self.image_linear + self.modulation + self.attention_image_only

    def __add__(self, other: "FluxFlops") -> "FluxFlops":
        return FluxFlops(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    def scaled(self, k: float) -> "FluxFlops":
        return FluxFlops(*(getattr(self, f.name) * k for f in dataclasses.fields(self)))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(linear=self.linear, total=self.total, total_image_only=self.total_image_only)
        return d


def flux_transformer_flops(config: Any, image_tokens: int, text_tokens: int, batch: int = 1) -> FluxFlops:
    """FLOPs of one ``FluxTransformer2DModel`` forward on ``image_tokens`` image and ``text_tokens`` text tokens.

    ``config``: the model's config (a diffusers ``FrozenDict``, a dict, or an object with the
    same attributes, e.g. :data:`FLUX1_DEV_CONFIG`). ``batch`` multiplies everything.
    """
    heads, hd = _cfg(config, "num_attention_heads"), _cfg(config, "attention_head_dim")
    d = heads * hd
    n_double, n_single = _cfg(config, "num_layers"), _cfg(config, "num_single_layers")
    p = _cfg(config, "patch_size", 1) or 1
    c_in = _cfg(config, "in_channels")
    c_out = (_cfg(config, "out_channels") or c_in) * p * p
    jd = _cfg(config, "joint_attention_dim")
    pd = _cfg(config, "pooled_projection_dim") or 0  # FLUX.2: no pooled text projection
    mlp_ratio = _cfg(config, "mlp_ratio", None)
    guidance = bool(_cfg(config, "guidance_embeds", False))
    blocks = n_double + n_single
    ni, nt = image_tokens, text_tokens

    # FLUX.1: GELU MLP D -> 4D -> D. FLUX.2 (config has mlp_ratio r): SwiGLU D -> 2rD, rD -> D.
    per_block = 12 * d * d if mlp_ratio is None else int(round((4 + 3 * float(mlp_ratio)) * d * d))
    image_macs = ni * (c_in * d + blocks * per_block + d * c_out)
    text_macs = nt * (jd * d + blocks * per_block)
    # time (256 -> D -> D), optional guidance (same), pooled text (P -> D -> D); adaLN linears:
    # double blocks 2 x (D -> 6D), single blocks D -> 3D, final norm D -> 2D.
    emb = (256 * d + d * d) * (2 if guidance else 1) + pd * d + d * d
    mod = n_double * 2 * 6 * d * d + n_single * 3 * d * d + 2 * d * d
    s = ni + nt
    attn = blocks * 2 * s * s * d
    attn_img = blocks * 2 * ni * ni * d
    f = FluxFlops(2.0 * image_macs, 2.0 * text_macs, 2.0 * (emb + mod), 2.0 * attn, 2.0 * attn_img)
    return f.scaled(batch) if batch != 1 else f


def flux_run_flops(config: Any, active_tokens: Sequence[int], text_tokens: int, calls_per_step: int = 1) -> FluxFlops:
    """FLOPs of a run whose step ``i`` ran the model on ``active_tokens[i]`` image tokens (per sample).

    ``calls_per_step`` = 2 for true CFG. Per-sample numbers: multiply by the batch yourself.
    """
    tot = FluxFlops()
    cache: dict[int, FluxFlops] = {}
    for m in active_tokens:
        if m not in cache:
            cache[m] = flux_transformer_flops(config, m, text_tokens)
        tot = tot + cache[m]
    return tot.scaled(calls_per_step)


def flop_summary(config: Any, active_tokens: Sequence[int], num_tokens: int, text_tokens: int,
                 calls_per_step: int = 1, baseline_steps: int = 50, extra_tokens: int | Sequence[int] = 0) -> dict:
    """FLOPs of a JiT run vs the dense sampler at the same steps and at ``baseline_steps``.

    Returns ``{"jit", "dense_same_steps", "dense_baseline": FluxFlops.as_dict(),
    "speedup_vs_same_steps", "speedup_vs_baseline": {kind: ratio}}`` where kind is one of
    ``image_linear`` (the paper's linear-in-tokens ratio), ``linear``, ``total`` and
    ``total_image_only``.

    ``extra_tokens``: image-stream tokens that every call runs in full, in the JiT run and in
    both dense runs alike (reference-image tokens): an int for every step, or one count per
    step (the baseline then repeats the last count after the listed steps).
    """
    steps = len(active_tokens)
    extra = [int(extra_tokens)] * steps if isinstance(extra_tokens, int) else [int(e) for e in extra_tokens]
    if len(extra) != steps:
        raise ValueError(f"extra_tokens: one count per step ({steps}), got {len(extra)}")
    tail = extra[-1] if extra else 0
    base_extra = (extra + [tail] * baseline_steps)[:baseline_steps]
    jit = flux_run_flops(config, [m + e for m, e in zip(active_tokens, extra)], text_tokens, calls_per_step)
    same = flux_run_flops(config, [num_tokens + e for e in extra], text_tokens, calls_per_step)
    base = flux_run_flops(config, [num_tokens + e for e in base_extra], text_tokens, calls_per_step)
    kinds = ("image_linear", "linear", "total", "total_image_only")

    def ratios(ref: FluxFlops) -> dict:
        return {k: getattr(ref, k) / getattr(jit, k) if getattr(jit, k) else float("nan") for k in kinds}

    return {
        "text_tokens": text_tokens,
        "extra_tokens": extra,
        "baseline_steps": baseline_steps,
        "jit": jit.as_dict(),
        "dense_same_steps": same.as_dict(),
        "dense_baseline": base.as_dict(),
        "speedup_vs_same_steps": ratios(same),
        "speedup_vs_baseline": ratios(base),
    }


@dataclass
class JiTReport:
    """What one sampler run did.

    Attributes:
        config: the :class:`~jit_sampler.JiTConfig` used (``None`` for a dense pipeline call).
        height, width: the token grid; ``num_tokens = height * width``.
        batch_size: samples in the run.
        sigmas: the ``steps + 1`` sigmas integrated over.
        stage_of_step: stage index of every step (0 = the sparsest stage that runs; ``config.effective_stages``
            maps it to the configured stage when a few-step run drops some).
        active_tokens: active image tokens per step (per sample).
        new_tokens: ``{step: tokens added at that transition}``.
        model_calls: transformer forward calls (CFG and per-sample calls each count).
        model_evals: velocity evaluations (= steps).
        time_model_s: wall time inside the velocity callable.
        time_sampler_s: everything else in the loop (anchors, lift, ITA, DMF, Euler).
        time_total_s: the whole loop.
        phase_times: pipeline phases outside the loop (``encode``, ``decode``, ...).
        flops: :func:`flop_summary` output when the caller knows the model (else ``{}``).
    """

    config: Any = None
    height: int = 0
    width: int = 0
    batch_size: int = 0
    sigmas: list[float] = field(default_factory=list)
    stage_of_step: list[int] = field(default_factory=list)
    active_tokens: list[int] = field(default_factory=list)
    new_tokens: dict[int, int] = field(default_factory=dict)
    model_calls: int = 0
    model_evals: int = 0
    time_model_s: float = 0.0
    time_sampler_s: float = 0.0
    time_total_s: float = 0.0
    phase_times: dict[str, float] = field(default_factory=dict)
    flops: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def steps(self) -> int:
        return len(self.active_tokens)

    @property
    def full_step_equivalents(self) -> float:
        """Sum of active-token fractions over steps (7.08 for the 7x preset at 64 x 64)."""
        n = self.num_tokens
        return sum(m / n for m in self.active_tokens) if n else 0.0

    @property
    def sampler_overhead(self) -> float:
        """Fraction of loop time spent outside the model."""
        return self.time_sampler_s / self.time_total_s if self.time_total_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        cfg = d["config"]
        if cfg is not None and dataclasses.is_dataclass(cfg):
            d["config"] = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                           if not isinstance(getattr(cfg, f.name), torch.Tensor)}
        d.update(num_tokens=self.num_tokens, steps=self.steps, full_step_equivalents=self.full_step_equivalents,
                 sampler_overhead=self.sampler_overhead)
        return d

    def summary(self) -> str:
        """One human-readable paragraph."""
        name = getattr(self.config, "name", None) or ("dense" if self.config is None else "custom")
        lines = [
            f"JiT[{name}] grid {self.height}x{self.width} ({self.num_tokens} tokens), batch {self.batch_size}, "
            f"{self.steps} steps, {self.model_calls} model calls, {self.full_step_equivalents:.2f} full-step equivalents",
            f"time: total {self.time_total_s:.3f}s, model {self.time_model_s:.3f}s, "
            f"sampler {self.time_sampler_s:.3f}s ({100 * self.sampler_overhead:.1f}%)",
        ]
        if self.flops:
            s, b = self.flops["speedup_vs_same_steps"], self.flops["speedup_vs_baseline"]
            lines.append(f"FLOPs speed-up vs dense {self.steps} steps: image-linear {s['image_linear']:.2f}x, "
                         f"total {s['total']:.2f}x; vs dense {self.flops['baseline_steps']}: "
                         f"image-linear {b['image_linear']:.2f}x, total {b['total']:.2f}x")
        return "\n".join(lines)
