"""The nf4 row of ``e2e``: a bitsandbytes 4-bit transformer under model CPU offload, sampled by JiT.

A tiny random FLUX.1 transformer is saved, loaded back with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)`` on CUDA, put in a ``FluxPipeline``
with ``enable_model_cpu_offload()``, and wrapped by ``enable_jit(pipe, "7x")``. Checked: the 4-bit
weights (type, packed bytes, quant_state) are the same after the JiT call, the offload hooks are
carried, and the JiT latent is within 1e-4 relative of the same JiT call on a plain fp32 transformer
holding the dequantized weights (``bitsandbytes.functional.dequantize_4bit``). CUDA only.
"""

from __future__ import annotations

import tempfile

import torch

from .common import Kit, _exact_fp32, _gen

REL_TOL = 1e-4
DRY_SKIP = "skipped: CUDA only (bitsandbytes 4-bit kernels); the dry run has no GPU"
TINY = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def _tiny_parts(seed: int = 0):
    """A random tiny FLUX transformer, VAE (scale factor 8: a 128 x 128 image is 8 x 8 tokens) and scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tr = FluxTransformer2DModel(**TINY).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
                            shift_factor=0.1159)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return tr, vae, sched


def _pipe(transformer, vae, sched):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _four_bit(model) -> dict:
    """name -> (type, dtype, packed bytes, quant_type, absmax) of every 4-bit weight, on the CPU."""
    import bitsandbytes as bnb

    snap = {}
    for name, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            qs = p.quant_state
            snap[name] = (type(p).__name__, p.dtype, p.data.detach().cpu().clone(),
                          None if qs is None else qs.quant_type,
                          None if qs is None else qs.absmax.detach().cpu().clone())
    return snap


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        (t1, d1, x1, q1, m1), (t2, d2, x2, q2, m2) = a[k], b[k]
        if (t1, d1, q1) != (t2, d2, q2) or not torch.equal(x1, x2):
            return False
        if (m1 is None) != (m2 is None) or (m1 is not None and not torch.equal(m1, m2)):
            return False
    return True


def nf4_check(kit: Kit) -> dict:
    """``{"status", "rows"}``; a failed check is also a kit failure (section ``e2e``)."""
    if kit.device != "cuda":
        return {"status": DRY_SKIP}
    try:
        import bitsandbytes as bnb
        from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    except Exception as exc:
        return {"status": f"skipped: bitsandbytes not importable ({exc!r}); pip install bitsandbytes"[:300]}
    from jit_sampler import enable_jit

    tr, vae, sched = _tiny_parts()
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        tr.save_pretrained(d)
        q = FluxTransformer2DModel.from_pretrained(d, quantization_config=nf4, torch_dtype=torch.float32)
    # The reference: the same architecture holding the dequantized weights, in plain fp32 on the GPU.
    state = {}
    for name, p in q.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            state[name] = bnb.functional.dequantize_4bit(p.data, p.quant_state).float()
        else:
            state[name] = p.detach().float()
    plain = FluxTransformer2DModel(**TINY).eval()
    plain.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=True)
    plain = plain.to("cuda")

    pipe = _pipe(q, vae, sched)
    pipe.enable_model_cpu_offload()
    before = _four_bit(q)
    hooks = len(getattr(pipe, "_all_hooks", []))
    jp = enable_jit(pipe, "7x")
    g = _gen(1)
    # On the execution device: the stock pipeline does not move given embeddings.
    inputs = dict(prompt_embeds=torch.randn(1, 6, TINY["joint_attention_dim"], generator=g).cuda(),
                  pooled_prompt_embeds=torch.randn(1, TINY["pooled_projection_dim"], generator=g).cuda(),
                  height=128, width=128, guidance_scale=3.5, output_type="latent")
    with torch.no_grad(), _exact_fp32():
        lat = jp(**inputs, generator=_gen(0)).images
        tokens = list(jp.last_jit_report.active_tokens)
        _, vae2, sched2 = _tiny_parts()
        ref_pipe = enable_jit(_pipe(plain, vae2.to("cuda"), sched2), "7x")
        ref = ref_pipe(**inputs, generator=_gen(0)).images
    after = _four_bit(jp.transformer)
    rel = float((lat.float().cpu() - ref.float().cpu()).norm() / ref.float().cpu().norm().clamp_min(1e-30))
    rows = [
        {"check": "4-bit weights", "ok": bool(before) and _same(before, after),
         "detail": f"{len(before)} Params4bit (nf4) weights; type, bytes, quant_type, absmax unchanged by the JiT call"},
        {"check": "same modules", "ok": jp.transformer is q, "detail": "enable_jit holds the caller's transformer"},
        {"check": "offload hooks", "ok": hooks > 0 and len(getattr(jp, "_all_hooks", [])) == hooks,
         "detail": f"_all_hooks: {hooks} on the stock pipeline, {len(getattr(jp, '_all_hooks', []))} on the JiT one"},
        {"check": "JiT ran", "ok": min(tokens) < max(tokens) == 64, "detail": f"active tokens {tokens}"},
        {"check": "latent vs dequantized fp32", "ok": rel <= REL_TOL and bool(torch.isfinite(lat).all()),
         "detail": f"relative difference {rel:.2e} (tolerance {REL_TOL:g})"},
    ]
    del jp, pipe, q, plain, ref_pipe
    torch.cuda.empty_cache()
    for r in rows:
        if not r["ok"]:
            kit.fail("e2e", f"nf4: {r['check']}: {r['detail']}"[:400])
    return {"status": "ok" if all(r["ok"] for r in rows) else "FAILED", "rows": rows}
