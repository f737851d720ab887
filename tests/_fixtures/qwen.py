"""A tiny, randomly initialised Qwen-Image pipeline built offline (no text encoder: tests pass
``prompt_embeds`` and ``prompt_embeds_mask``).

A real ``QwenImagePipeline`` (diffusers) around a 2-block ``QwenImageTransformer2DModel`` and a
3-level ``AutoencoderKLQwenImage`` (``vae_scale_factor`` 4, so a 64 x 64 image is a 16 x 16
latent and an 8 x 8 token grid). The scheduler carries Qwen-Image's published scheduler
settings (dynamic exponential shift, ``shift_terminal`` 0.02), so the pipeline's own schedule
is exercised as the real model uses it.
"""

from __future__ import annotations

import torch

import tests._fixtures.flux  # noqa: F401  (one torch thread)

TXT_DIM = 16
TXT_TOKENS = 7
Z_DIM = 4


def build_qwen(cls=None, seed: int = 0, **transformer_over):
    """A tiny pipeline of class ``cls`` (default ``QwenImagePipeline``), deterministic from ``seed``."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    cls = cls or QwenImagePipeline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tr_kw = dict(patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=TXT_DIM, guidance_embeds=False,
                     axes_dims_rope=(4, 6, 6))
        tr_kw.update(transformer_over)
        transformer = QwenImageTransformer2DModel(**tr_kw)
        g = torch.Generator().manual_seed(seed + 100)
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=(0.2 * torch.randn(Z_DIM, generator=g)).tolist(),
            latents_std=(1.0 + 0.5 * torch.rand(Z_DIM, generator=g)).tolist())
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    pipe = cls(scheduler=scheduler, vae=vae.eval(), text_encoder=None, tokenizer=None,
               transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_inputs(batch: int = 1, seed: int = 1, prefix: str = "", valid=None):
    """``{prefix}prompt_embeds [B, T, 16]`` and ``{prefix}prompt_embeds_mask [B, T]`` from ``seed``.

    ``valid``: valid text tokens per sample (the rest is padding, as the text encoder pads a
    batch); default ``T`` for the first sample and ``T - 2`` for the others, so that batches
    carry a real mask.
    """
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, TXT_TOKENS, TXT_DIM, generator=g)
    valid = valid or [TXT_TOKENS] + [TXT_TOKENS - 2] * (batch - 1)
    mask = torch.zeros(batch, TXT_TOKENS, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
        emb[b, n:] = 0  # the pipeline's encoder zero-pads
    return {f"{prefix}prompt_embeds": emb, f"{prefix}prompt_embeds_mask": mask}
