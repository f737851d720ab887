"""Shared fixtures: a tiny, randomly initialised FLUX.1 pipeline built offline.

A real ``FluxPipeline`` (diffusers) around a 1 + 1 block ``FluxTransformer2DModel`` and a
4-level ``AutoencoderKL`` with 8 channels (vae_scale_factor 8 like FLUX, so image sizes
are multiples of 16 and a 128 x 128 image is an 8 x 8 token grid). No text encoders:
tests pass ``prompt_embeds`` / ``pooled_prompt_embeds`` made by :func:`prompt_inputs`.
:func:`stock_pipe` puts another pipeline class (or other components) around the modules of one,
and :func:`controlnet` makes a tiny ControlNet from its transformer.
"""

from __future__ import annotations

import torch

# These tiny models are far too small to gain from intra-op threads, and on a shared 2-core
# machine two threads contend with other processes (measured: 10x slower forwards).
torch.set_num_threads(1)

TXT_DIM = 32
POOLED_DIM = 16
TXT_TOKENS = 6
# The text-encoder components a tiny pipeline leaves out (``from_pretrained`` wants them named again).
NO_TEXT = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def build_pipe(cls=None, guidance_embeds: bool = True, seed: int = 0):
    """A tiny pipeline of class ``cls`` (default ``FluxPipeline``), deterministic from ``seed``.

    For a ``FluxFillPipeline`` (or subclass) the transformer has FLUX Fill's channel layout:
    16 latent + 16 masked-image + 4 * 8 * 8 = 256 mask channels in, 16 out (4 latent channels
    packed 2 x 2, vae_scale_factor 8).
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxPipeline,
                           FluxTransformer2DModel)

    cls = cls or FluxPipeline
    fill = issubclass(cls, FluxFillPipeline)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16 + 16 + 256 if fill else 16, out_channels=16 if fill else None,
            num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TXT_DIM, pooled_projection_dim=POOLED_DIM,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = cls(scheduler=scheduler, vae=vae, transformer=transformer, **NO_TEXT)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_pipe(base, cls=None, **replace):
    """A pipeline of class ``cls`` (default ``FluxPipeline``) over the scheduler, VAE and transformer of
    ``base`` (no text encoders), with the components in ``replace`` (``transformer=``, ``scheduler=``,
    ``controlnet=``, ...) put in their place; ``base`` is left as it is."""
    from diffusers import FluxPipeline

    cls = cls or FluxPipeline
    parts = {"scheduler": base.scheduler, "vae": base.vae, "transformer": base.transformer, **NO_TEXT}
    pipe = cls(**{**parts, **replace})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet(transformer, seed: int):
    """A 1 + 1 block ``FluxControlNetModel`` made from ``transformer`` (``from_transformer``), deterministic from
    ``seed``; its zero-initialised output layers are left as they are."""
    from diffusers import FluxControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                    attention_head_dim=16, num_attention_heads=2)


def prompt_inputs(batch: int = 1, seed: int = 1, prefix: str = ""):
    """``{prefix}prompt_embeds [B, T, 32]`` and ``{prefix}pooled_prompt_embeds [B, 16]`` from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}prompt_embeds": torch.randn(batch, TXT_TOKENS, TXT_DIM, generator=g),
        f"{prefix}pooled_prompt_embeds": torch.randn(batch, POOLED_DIM, generator=g),
    }


class CallLog:
    """Records every call of ``transformer.forward`` while active: the image-token count, batch, hidden
    states, img_ids, encoder states, timestep and joint_attention_kwargs of each (tests read what they need)."""

    def __init__(self, transformer):
        self.tr, self.orig, self.calls = transformer, transformer.forward, []

    def __enter__(self):
        def fwd(*a, **kw):
            x = kw["hidden_states"]
            self.calls.append({"tokens": x.shape[1], "batch": x.shape[0], "x": x.clone(),
                               "img_ids": kw["img_ids"].clone(), "enc": kw["encoder_hidden_states"].clone(),
                               "t": float(kw["timestep"][0]), "jak": kw.get("joint_attention_kwargs")})
            return self.orig(*a, **kw)

        self.tr.forward = fwd
        return self

    def __exit__(self, *exc):
        del self.tr.forward
