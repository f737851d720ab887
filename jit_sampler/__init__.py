"""jit_sampler: the JiT (Just-in-Time) sampler for diffusion transformers.

Training-free spatial acceleration (arXiv 2603.10744, ``docs/method.md``): early steps run
the transformer on a growing subset of image tokens and integrate the whole latent with an
interpolated ("lifted") velocity; new tokens enter through a deterministic micro-flow.

The public surface:

- configuration: :class:`JiTConfig` (presets ``"4x"``, ``"7x"``, ``"reference"``,
  ``"7x-reference"``; :func:`available_presets`, :data:`PRESETS`);
- the model-agnostic loop: :func:`jit_sample` driving any :data:`VelocityFn`, the static
  stage layout :func:`make_plan` / :class:`JiTPlan`, the per-run :class:`JiTReport`, and the
  sigma schedules :func:`beta_sigmas` / :func:`linear_sigmas`;
- diffusers integration (:mod:`jit_sampler.pipelines`, imported on first use):
  :class:`JiTFluxPipeline` and the other JiT pipelines (FLUX.1 Kontext / Img2Img / Inpaint /
  Fill / ControlNet, FLUX.2-klein (+ KV), Qwen-Image; see :mod:`jit_sampler.pipelines`), :func:`enable_jit`,
  :class:`FluxVelocity`, and the fused attention processor :class:`AnchorAttnProcessor`
  with :func:`install_anchor_attention` / :func:`remove_anchor_attention` /
  :func:`use_anchor_attention`; cache-dit on a JiT pipeline: :func:`enable_cache_dit` /
  :func:`disable_cache_dit` (:func:`use_cache_dit` for a bare transformer).

RAS (Region-Adaptive Sampling, ``docs/ras.md``) on the same kernels: :class:`RASConfig`,
:func:`ras_sample`, :class:`RASKVCache`, :class:`RASReport`, :class:`RASFinalStage` (RAS in
JiT's final dense stage); :func:`enable_ras` for FLUX.1 and
SD3 pipelines; :class:`JiTStableDiffusion3Pipeline` (SD3 / 3.5, ``jit=`` and ``ras=``).

Building blocks (anchor lattices, FLOP counting, ...) stay importable from their modules:
:mod:`jit_sampler.anchors`, :mod:`jit_sampler.schedule`, :mod:`jit_sampler.report`.
"""

from . import _notices

_notices.install()  # before anything imports diffusers (docstring of _notices)

from .config import PRESETS, JiTConfig, available_presets
from .report import JiTReport
from .ras import RASConfig, RASFinalStage, RASKVCache, RASReport, ras_sample
from .sampler import JiTPlan, VelocityFn, jit_sample, make_plan
from .schedule import beta_sigmas, linear_sigmas
from ._pipeline_names import PIPELINE_EXPORTS as _PIPELINE_NAMES  # jit_sampler.pipelines' names, loaded on first use


def __getattr__(name):
    # The diffusers integration imports diffusers + transformers (slow); load it on first use.
    if name in _PIPELINE_NAMES:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'jit_sampler' has no attribute {name!r}")


__all__ = sorted(
    [
        "JiTConfig",
        "JiTPlan",
        "JiTReport",
        "PRESETS",
        "RASConfig",
        "RASFinalStage",
        "RASKVCache",
        "RASReport",
        "ras_sample",
        "VelocityFn",
        "available_presets",
        "beta_sigmas",
        "jit_sample",
        "linear_sigmas",
        "make_plan",
        *_PIPELINE_NAMES,
    ]
)
