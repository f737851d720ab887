"""The tiny FLUX driven by the JiT sampler: its ``velocity_fn`` and a one-call sampler.

Every user of the embedded model (the demo, the CLI's default model, the quality suite, the
speed benchmark, the data-parallel example) builds its velocity here, so the tiny model runs
exactly the FLUX.1 code path of :class:`jit_sampler.FluxVelocity`.
"""

from __future__ import annotations

import torch

from jit_sampler import FluxVelocity, JiTConfig, beta_sigmas, jit_sample, linear_sigmas

from .model import image_ids, text_ids

__all__ = ["TinyVelocity", "config_sigmas", "sample_tiny"]


class TinyVelocity(FluxVelocity):
    """``velocity_fn`` of :func:`~jit_sampler.jit_sample` for the tiny FLUX.

    :class:`~jit_sampler.FluxVelocity` (``cache_context``, per-stage ``img_ids`` rows,
    per-sample sets run one forward per sample) with the class label as the prompt and the
    null label as the negative prompt of true CFG (``cfg_scale != 1``: two passes per step).
    ``grid=(H, W)`` runs the architecture on another token grid (speed benchmarks; the
    trained weights know 16 x 16 only). Position ids are in the model's dtype. ``calls``
    counts forwards.
    """

    def __init__(self, model, labels: torch.Tensor, cfg_scale: float = 1.0, backend: str = "auto",
                 token_bucket: int = 0, grid: tuple[int, int] | None = None):
        height, width = grid or (model.height, model.width)
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            enc, pooled = model.encode(labels)
            tids = text_ids(enc.shape[1], labels.device).to(dtype)
            negative = None
            if float(cfg_scale) != 1.0:
                n_enc, n_pooled = model.encode(torch.full_like(labels, model.null_label))
                negative = (n_enc, n_pooled, tids)
        super().__init__(model.transformer, enc, pooled, tids, image_ids(height, width, labels.device).to(dtype),
                         negative=negative, true_cfg_scale=cfg_scale, backend=backend, token_bucket=token_bucket)


def config_sigmas(config: JiTConfig) -> list[float]:
    """The config's own schedule: Beta-warped (``sigma_schedule="beta"``) or linear."""
    if config.sigma_schedule == "beta":
        return beta_sigmas(config.total_steps, config.beta_alpha, config.beta_beta)
    return linear_sigmas(config.total_steps)


def sample_tiny(model, labels: torch.Tensor, noise: torch.Tensor, config: JiTConfig, *, sigmas=None,
                seed: int = 0, cfg_scale: float = 1.0):
    """Integrate ``noise [B, 256, 4]`` for ``labels [B]`` with ``config`` (Beta sigmas unless ``sigmas``
    is given) and every JiT draw from ``seed``; returns ``(tokens, report)``."""
    if sigmas is None:
        sigmas = beta_sigmas(config.total_steps, config.beta_alpha, config.beta_beta)
    gen = torch.Generator(device=noise.device).manual_seed(seed)
    fn = TinyVelocity(model, labels, cfg_scale, backend=config.backend, token_bucket=config.token_bucket)
    return jit_sample(fn, noise, model.height, model.width, sigmas, config, gen)
