"""A tiny, randomly initialised FLUX.2-klein pipeline built offline (no text encoder: tests pass
``prompt_embeds``)."""

from __future__ import annotations

import torch

TXT_DIM = 32
TXT_TOKENS = 5


def build_klein(cls=None, seed: int = 0, is_distilled: bool = False):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    cls = cls or Flux2KleinPipeline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TXT_DIM, timestep_guidance_channels=32, mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            latent_channels=8, norm_num_groups=4, sample_size=64)
        vae.bn.running_mean.normal_(0, 0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    sched = FlowMatchEulerDiscreteScheduler()
    pipe = cls(scheduler=sched, vae=vae.eval(), text_encoder=None, tokenizer=None, transformer=transformer.eval(),
               is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, TXT_TOKENS, TXT_DIM, generator=torch.Generator().manual_seed(seed))
