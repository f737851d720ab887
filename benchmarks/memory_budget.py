"""Computed GPU memory of FLUX.1-dev with JiT at 1024 x 1024 under each recipe of docs/memory.md.

Nothing is measured: every number is parameter counts x bytes per parameter, plus activations
from the token counts. Run: ``python -m benchmarks.memory_budget`` (prints the tables of
docs/memory.md; tests/pipelines/test_memory_recipes.py checks that the doc holds this output).

Inputs:

- parameter counts: the FLUX.1-dev transformer built on the meta device from its published config
  (11.90 B; per block, per Linear, and which parameters diffusers' layerwise casting leaves in
  bf16, read from diffusers itself); T5-XXL encoder 4.7 B, CLIP-L 0.12 B, VAE 0.08 B;
- bytes per parameter: bf16 2; fp8 storage 1; GGUF Q8_0 34 bytes per 32 weights, Q4_0 18 per 32
  (every Linear weight quantized, the rest bf16); bitsandbytes nf4 4 bits + one fp32 absmax per
  64 weights (no double quantization), Linear weights only;
- activations (bf16, batch 1, inference): the widest point of a FLUX single-stream block holds
  ``ACT_WIDTHS`` = 13 tensors of ``N x 3072`` at once (residual, norm, attention output, the MLP's
  4 x 3072 GELU output, their 5 x 3072 concatenation, the output projection); ``N`` = image tokens
  + 512 text tokens. JiT's stages run ``token_counts`` image tokens; its last stage is dense, so
  its peak is the stock one; its own buffers (the full latent, anchor indices) are below 1 MiB;
- VAE decode at 1024 x 1024: ``VAE_MAPS`` = 5 live 128-channel bf16 feature maps at full
  resolution (the last up block: input, norm, conv, residual, upsample output); 1/4 of that with
  ``pipe.vae.enable_tiling()`` (512 x 512 tiles);
- not included: the CUDA context and allocator slack (0.3 - 0.8 GiB, driver dependent): a recipe is
  said to fit a card when the computed peak + ``MARGIN_GIB`` is at most the card's memory.
"""

from __future__ import annotations

GIB = 2 ** 30
T5, CLIP, VAE = 4.7e9, 0.12e9, 0.08e9
HIDDEN, TEXT_TOKENS, IMAGE_TOKENS = 3072, 512, 4096  # 1024 x 1024: a 64 x 64 grid of 2 x 2 latent patches
ACT_WIDTHS = 13
VAE_MAPS = 5
MARGIN_GIB = 1.0
CARDS = (24, 16, 12)
PCIE_GBPS = 25.0  # PCIe 4.0 x16, effective host -> device


def flux_dev_counts() -> dict:
    """Parameter counts of the FLUX.1-dev transformer, from its config on the meta device."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        t = FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                   guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    total = sum(p.numel() for p in t.parameters())
    linear = sum(m.weight.numel() for m in t.modules() if isinstance(m, torch.nn.Linear))
    double = sum(p.numel() for p in t.transformer_blocks[0].parameters())
    single = sum(p.numel() for p in t.single_transformer_blocks[0].parameters())
    blocks = 19 * double + 38 * single
    largest = max(m.weight.numel() for m in t.modules() if isinstance(m, torch.nn.Linear))
    t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8 = sum(p.numel() for p in t.parameters() if p.dtype == torch.float8_e4m3fn)
    return dict(total=total, linear=linear, double=double, single=single, outside=total - blocks,
                largest_linear=largest, fp8=fp8)


def activations(image_tokens: int) -> float:
    """Bytes of transformer activations at the widest point of a block, ``image_tokens`` + 512 text tokens."""
    return ACT_WIDTHS * (image_tokens + TEXT_TOKENS) * HIDDEN * 2


def vae_decode(tiling: bool = False) -> float:
    full = VAE_MAPS * 1024 * 1024 * 128 * 2
    return full / 4 if tiling else full


def recipes(c: dict) -> list[dict]:
    """Per recipe: the peak of each phase (encode, denoise, decode) in bytes; model / group offload keep one
    model (or one group) on the GPU at a time."""
    act = activations(IMAGE_TOKENS)
    rest = c["total"] - c["linear"]
    t5_bf16 = T5 * 2
    out = []

    def add(name, transformer, transient, encode, decode, note=""):
        out.append(dict(name=name, transformer=transformer, encode=encode,
                        denoise=transformer + transient + act, decode=decode, note=note))

    model_offload_encode = t5_bf16  # T5 alone on the GPU; CLIP (0.24 GB) runs before it, alone
    decode = VAE * 2 + vae_decode()
    add("bf16 + model offload", c["total"] * 2, 0, model_offload_encode, decode)
    # group offload, block level, 1 block per group, streamed: the running block + the prefetched one
    # + the parameters outside the blocks; T5's 24 blocks likewise (its 32128 x 4096 embedding outside).
    t5_embed = 32128 * 4096
    t5_block = (T5 - t5_embed) / 24
    add("bf16 + group offload (block, stream)", (2 * c["double"] + c["outside"]) * 2, 0,
        (2 * t5_block + t5_embed) * 2, decode,
        note=f"moves {c['total'] * 2 / 1e9:.1f} GB per transformer call: >= "
             f"{c['total'] * 2 / 1e9 / PCIE_GBPS:.2f} s at {PCIE_GBPS:.0f} GB/s, whatever JiT skips")
    # fp8 layerwise casting: the cast leaves in fp8, the rest (norms, AdaLN modulation) in bf16; one
    # layer at a time is upcast to bf16 while it runs.
    add("fp8 layerwise casting + model offload", c["fp8"] + (c["total"] - c["fp8"]) * 2, c["largest_linear"] * 2,
        model_offload_encode, decode)
    # GGUF: the layer being run is dequantized to bf16 for its matmul.
    add("GGUF Q8_0 + model offload", c["linear"] * 34 / 32 + rest * 2, c["largest_linear"] * 2,
        model_offload_encode, decode)
    add("GGUF Q4_0 + model offload", c["linear"] * 18 / 32 + rest * 2, c["largest_linear"] * 2,
        model_offload_encode, decode)
    add("nf4 (bitsandbytes) + model offload", c["linear"] * (0.5 + 4 / 64) + rest * 2, c["largest_linear"] * 2,
        model_offload_encode, decode)
    for r in out:
        r["peak"] = max(r["encode"], r["denoise"], r["decode"])
        r["fits"] = [card for card in CARDS if r["peak"] / GIB + MARGIN_GIB <= card]
    return out


def tables(c: dict | None = None) -> str:
    c = c or flux_dev_counts()
    from jit_sampler import JiTConfig

    lines = [f"FLUX.1-dev transformer: {c['total'] / 1e9:.2f} B parameters ({c['linear'] / 1e9:.2f} B in Linear "
             f"weights; a double block {c['double'] / 1e6:.0f} M, a single block {c['single'] / 1e6:.0f} M; "
             f"{c['fp8'] / 1e9:.2f} B stored in fp8 by layerwise casting); T5-XXL {T5 / 1e9:.1f} B, CLIP-L "
             f"{CLIP / 1e9:.2f} B, VAE {VAE / 1e9:.2f} B.", "",
             "| recipe (computed, GiB) | transformer weights on GPU | encode | denoise | decode | peak | fits |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in recipes(c):
        fits = ", ".join(f"{card} GB" for card in r["fits"]) or "none of 24 / 16 / 12 GB"
        lines.append(f"| {r['name']} | {r['transformer'] / GIB:.2f} | {r['encode'] / GIB:.2f} | "
                     f"{r['denoise'] / GIB:.2f} | {r['decode'] / GIB:.2f} | {r['peak'] / GIB:.2f} | {fits} |")
    notes = [r for r in recipes(c) if r["note"]]
    lines += [""] + [f"{r['name']}: {r['note']}." for r in notes]
    lines += ["", "| JiT preset (computed) | image tokens per stage | activations per stage (GiB) |",
              "| --- | --- | --- |"]
    for name in ("4x", "7x"):
        counts = JiTConfig.preset(name).token_counts(IMAGE_TOKENS)
        lines.append(f"| {name} | {' / '.join(map(str, counts))} | "
                     f"{' / '.join(f'{activations(n) / GIB:.2f}' for n in counts)} |")
    lines.append(f"| stock | {IMAGE_TOKENS} | {activations(IMAGE_TOKENS) / GIB:.2f} |")
    lines.append("")
    lines.append(f"VAE decode with `pipe.vae.enable_tiling()`: {(VAE * 2 + vae_decode(True)) / GIB:.2f} GiB "
                 f"instead of {(VAE * 2 + vae_decode()) / GIB:.2f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables())
