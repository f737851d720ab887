"""A complete, randomly initialised FLUX.1 pipeline folder, built offline (for smoke runs).

    python -m jit_eval.tiny_pipeline /tmp/tiny-flux-pipe
    jit-flux --model /tmp/tiny-flux-pipe --prompt "a red fox" --height 128 --width 128 --compare

Every component FluxPipeline.from_pretrained loads is here, tiny: a 1 + 1 block
FluxTransformer2DModel, a 4-level AutoencoderKL (vae_scale_factor 8 like FLUX), a 2-layer
CLIP text model with a byte-level tokenizer (256 byte symbols, no merges) and a 2-layer T5
encoder with a character-level unigram tokenizer. The images are noise-like (random weights); the point is
that the folder exercises the real loading and prompt-encoding path with no download.
"""

from __future__ import annotations

import argparse
import torch


def _clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), len(vocab)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(97, 123)]  # specials, space, a-z
    return T5TokenizerFast(vocab=[(p, 0.0 if k < 3 else -1.0) for k, p in enumerate(pieces)], extra_ids=0,
                           model_max_length=512), len(pieces)


def build_tiny_flux_pipeline(path: str, seed: int = 0) -> str:
    """Write the pipeline folder to ``path`` (deterministic from ``seed``); returns ``path``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, clip_vocab = _clip_tokenizer()
    t5_tok, t5_vocab = _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
                                            max_position_embeddings=77, bos_token_id=0,
                                            eos_token_id=1, pad_token_id=1))
        t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_tiny_flux_pipeline(args.path, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
