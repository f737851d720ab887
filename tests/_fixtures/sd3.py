"""Shared fixtures: a tiny, randomly initialised Stable Diffusion 3 pipeline built offline.

A real ``StableDiffusion3Pipeline`` (diffusers) around a 2-block ``SD3Transformer2DModel``
(patch 2, 4 latent channels, the last block ``context_pre_only`` as in SD3) and the tiny
``AutoencoderKL`` of :mod:`tests._fixtures.flux` (vae_scale_factor 8: a 128 x 128 image is an
8 x 8 token grid). No text encoders (SD3 has three): tests pass ``prompt_embeds`` /
``pooled_prompt_embeds`` (and the negative ones for CFG) made by :func:`prompt_inputs`.
``qk_norm="rms_norm"`` and ``dual_attention_layers`` give SD3.5's layout.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)

TXT_DIM = 32
POOLED_DIM = 16
TXT_TOKENS = 6


def build_pipe(cls=None, seed: int = 0, qk_norm=None, dual_attention_layers=(), shift: float = 3.0):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    cls = cls or StableDiffusion3Pipeline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=TXT_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM,
            out_channels=4, pos_embed_max_size=32, qk_norm=qk_norm, dual_attention_layers=tuple(dual_attention_layers),
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
               tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_inputs(batch: int = 1, seed: int = 1, negative: bool = True):
    """``prompt_embeds [B, T, 32]``, ``pooled_prompt_embeds [B, 16]`` (and the negative pair) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(batch, TXT_TOKENS, TXT_DIM, generator=g),
           "pooled_prompt_embeds": torch.randn(batch, POOLED_DIM, generator=g)}
    if negative:
        out["negative_prompt_embeds"] = torch.randn(batch, TXT_TOKENS, TXT_DIM, generator=g)
        out["negative_pooled_prompt_embeds"] = torch.randn(batch, POOLED_DIM, generator=g)
    return out
