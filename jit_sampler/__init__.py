"""jit_sampler: the JiT (Just-in-Time) sampler for diffusion transformers.

Training-free spatial acceleration (arXiv 2603.10744): early steps run the transformer on
a growing subset of image tokens and integrate the whole latent with an interpolated
("lifted") velocity; new tokens enter through a deterministic micro-flow.

Main entry points: :class:`JiTConfig` (presets ``"4x"``, ``"7x"``, ``"reference"``),
:func:`jit_sample` (the model-agnostic loop), :class:`JiTFluxPipeline` / :func:`enable_jit`
(diffusers FLUX.1 integration), :class:`JiTFlux2KleinPipeline` (FLUX.2-klein) and :class:`JiTReport`.
"""

from .anchors import activate_tokens, checkerboard_lattice, fit_to_budget, initial_anchors, stride_lattice
from .config import PRESETS, JiTConfig, available_presets
from .core import JiTPlan, draw_normal, jit_sample, make_plan
from .report import FLUX1_DEV_CONFIG, FluxFlops, JiTReport, flop_summary, flux_run_flops, flux_transformer_flops
from .schedule import beta_ppf, beta_sigmas, linear_sigmas, stage_layout


def __getattr__(name):
    # The diffusers integration imports diffusers + transformers (slow); load it on first use.
    if name in ("JiTFluxPipeline", "enable_jit", "FluxVelocity"):
        from . import flux

        return getattr(flux, name)
    if name == "JiTFlux2KleinPipeline":
        from . import flux2

        return flux2.JiTFlux2KleinPipeline
    if name in ("AnchorAttnProcessor", "install_anchor_attention", "remove_anchor_attention", "use_anchor_attention"):
        from . import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'jit_sampler' has no attribute {name!r}")


__all__ = [
    "AnchorAttnProcessor",
    "FLUX1_DEV_CONFIG",
    "FluxFlops",
    "FluxVelocity",
    "JiTConfig",
    "JiTFlux2KleinPipeline",
    "JiTFluxPipeline",
    "JiTPlan",
    "JiTReport",
    "PRESETS",
    "activate_tokens",
    "available_presets",
    "beta_ppf",
    "beta_sigmas",
    "checkerboard_lattice",
    "draw_normal",
    "enable_jit",
    "fit_to_budget",
    "flop_summary",
    "flux_run_flops",
    "flux_transformer_flops",
    "initial_anchors",
    "install_anchor_attention",
    "jit_sample",
    "linear_sigmas",
    "make_plan",
    "remove_anchor_attention",
    "stage_layout",
    "stride_lattice",
    "use_anchor_attention",
]
