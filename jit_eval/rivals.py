"""The methods JiT is compared against, on the same velocity callables (docs/evaluation.md section 3).

- :func:`ras_sample`: a region-adaptive sampler in the spirit of RAS (Liu et al., 2025),
  rebuilt on :mod:`jit_kernels`' gather/scatter ops. Each sparse step recomputes only the
  tokens whose cached velocity is most likely stale and reuses the cache for the rest; the
  first ``warmup`` steps and every ``refresh_every``-th step after them run every token.
- :class:`BlockWorkCounter`: counts which transformer blocks actually ran (cache hooks skip
  blocks or whole attention modules) and turns that into FLOPs with the model's dimensions,
  so every method, cached or not, is costed by the same rule.
- :func:`cache_hook`: a context manager around ``transformer.enable_cache(...)`` that
  always leaves the model without hooks and with clean state.

The staleness score of the RAS-style sampler is ours (the RAS paper scores regions by the
model's output): token ``n`` carries a rate ``r_n = |v_new - v_cached| / age`` measured the
last time it was recomputed, and its expected error if reused again is ``r_n * (age_n + 1)``;
the top ``ratio * N`` tokens by that score (batch mean) are recomputed. Tokens that are not
recomputed are also absent from attention (no key/value cache), exactly as JiT's inactive
tokens are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

import jit_kernels as jk

from jit_sampler.report import flux_transformer_flops

__all__ = ["ras_sample", "RASReport", "BlockWorkCounter", "cache_hook"]


@dataclass
class RASReport:
    """What :func:`ras_sample` did: tokens computed per step (of ``num_tokens``) and model calls."""

    num_tokens: int
    active_tokens: list[int] = field(default_factory=list)
    model_calls: int = 0

    @property
    def full_step_equivalents(self) -> float:
        return sum(self.active_tokens) / self.num_tokens


@torch.no_grad()
def ras_sample(velocity_fn, latents: torch.Tensor, height: int, width: int, sigmas: Sequence[float], *,
               ratio: float, warmup: int = 2, refresh_every: int = 5, backend: str = "auto"):
    """Euler integration of ``latents [B, N, C]`` where sparse steps recompute ``int(ratio * N)`` tokens.

    ``velocity_fn`` has :func:`jit_sampler.jit_sample`'s signature. Returns ``(y, RASReport)``.
    """
    if latents.dim() != 3 or latents.shape[1] != height * width:
        raise ValueError(f"latents must be [B, {height * width}, C], got {tuple(latents.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if warmup < 2:
        raise ValueError(f"warmup must be >= 2 dense steps (the staleness rates need two), got {warmup}")
    if refresh_every < 0:
        raise ValueError(f"refresh_every must be >= 0 (0: never), got {refresh_every}")
    b, n, c = latents.shape
    sig = [float(s) for s in sigmas]
    m = max(1, int(n * ratio))
    y = latents.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    device = y.device
    all_idx = torch.arange(n, device=device)
    v_cache = torch.zeros_like(y)
    rate = torch.zeros(n, device=device)
    age = torch.zeros(n, device=device)
    report = RASReport(n)
    calls0 = getattr(velocity_fn, "calls", None)
    for i in range(len(sig) - 1):
        dense = m >= n or i < warmup or (refresh_every > 0 and (i - warmup) % refresh_every == refresh_every - 1)
        if dense:
            idx = all_idx
        else:
            score = rate * (age + 1.0)
            idx = torch.topk(score, m, sorted=False).indices.sort().values
        x_act = y if dense else jk.gather_tokens(y, idx, backend=backend)
        v = velocity_fn(x_act, idx, sig[i], i).to(torch.float32)
        old = v_cache if dense else jk.gather_tokens(v_cache, idx, backend=backend)
        if i > 0:  # rate of change of the recomputed tokens since they were last computed
            a = age[idx] + 1.0
            rate[idx] = (v - old).abs().mean(dim=(0, 2)) / a
        if dense:
            v_cache.copy_(v)
        else:
            jk.scatter_tokens_(v_cache, idx, v, backend=backend)
        age += 1.0
        age[idx] = 0.0
        y.add_(v_cache, alpha=sig[i + 1] - sig[i])
        report.active_tokens.append(int(idx.numel()))
    calls = getattr(velocity_fn, "calls", None)
    report.model_calls = calls - calls0 if isinstance(calls, int) and isinstance(calls0, int) else len(report.active_tokens)
    return y.to(latents.dtype), report


class BlockWorkCounter:
    """FLOPs a ``FluxTransformer2DModel`` actually spent, block by block, while attached.

    Every forward adds the embedders and modulation of its token count; each block adds its
    attention half (q/k/v/out projections: 1/3 of its linear work, plus the quadratic
    attention) when its attention module's ``to_q`` runs, and its MLP half (2/3 of its
    linear work) when its MLP runs. Cache hooks that skip blocks or predict attention
    outputs therefore lower the count; dense runs give :func:`flux_transformer_flops`
    exactly. Use as a context manager.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        self.config = transformer.config
        self.flops = 0.0
        self.forwards = 0
        self._handles = []
        self._cur = None

    def _per_call(self, tokens: int, text: int, batch: int):
        f = flux_transformer_flops(self.config, tokens, text, batch)
        nb = self.config.num_layers + self.config.num_single_layers
        lin = (f.image_linear + f.text_linear)
        d = self.config.num_attention_heads * self.config.attention_head_dim
        p = self.config.patch_size or 1
        c_in = self.config.in_channels
        c_out = (self.config.out_channels or c_in) * p * p
        embed = 2.0 * batch * (tokens * (c_in * d + d * c_out) + text * self.config.joint_attention_dim * d)
        blk = (lin - embed) / nb
        return f.modulation + embed, blk / 3 + f.attention / nb, 2 * blk / 3

    def _pre(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        text = enc.shape[1] if enc is not None else 0
        base, self._attn, self._mlp = self._per_call(hs.shape[1], text, hs.shape[0])
        self.flops += base
        self.forwards += 1

    def _add(self, attr):
        def hook(module, args, out):
            self.flops += getattr(self, attr)
        return hook

    def __enter__(self):
        tr = self.transformer
        self._handles.append(tr.register_forward_pre_hook(self._pre, with_kwargs=True))
        for blk in tr.transformer_blocks:
            self._handles.append(blk.attn.to_q.register_forward_hook(self._add("_attn")))
            self._handles.append(blk.ff.register_forward_hook(self._add("_mlp")))
        for blk in tr.single_transformer_blocks:
            self._handles.append(blk.attn.to_q.register_forward_hook(self._add("_attn")))
            self._handles.append(blk.proj_mlp.register_forward_hook(self._add("_mlp")))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


@contextlib.contextmanager
def cache_hook(transformer, config):
    """``transformer.enable_cache(config)`` for the duration of the block (``None``: no hook);
    the hook state is reset on entry and the hooks removed on exit. A callable ``config`` is a
    cache of another library: ``config(transformer)`` is the context manager entered instead
    (e.g. ``functools.partial(jit_sampler.use_cache_dit, cache_config=...)``)."""
    if config is None:
        yield transformer
        return
    if callable(config):
        with config(transformer):
            yield transformer
        return
    transformer.enable_cache(config)
    try:
        transformer._reset_stateful_cache()
        yield transformer
    finally:
        transformer.disable_cache()
