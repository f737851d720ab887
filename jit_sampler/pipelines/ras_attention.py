"""RAS's per-layer key/value cache as attention processors for diffusers' FLUX and SD3 transformers.

On a RAS step the transformer runs on the computed tokens only; each attention layer writes
their keys and values into its cache rows and lets their queries attend to the cached keys and
values of *all* image tokens (``docs/ras.md`` sections 3 and 6). The cache lives in the call's
:class:`~jit_sampler.ras.RASKVCache`, handed to the processors as the attention kwarg
``ras_kv`` (``joint_attention_kwargs={"ras_kv": kv}``); the processors hold no state. Without
``ras_kv`` (or with it off) they call the processor they replaced, so a stock or JiT call
through them is the stock computation.

:func:`use_ras_attention` installs them for the duration of a block and puts the replaced
processors back; nested or concurrent uses on one transformer share one installation (a
counted lock), which the last user removes.

- FLUX (``FluxAttention`` with the stock ``FluxAttnProcessor``): keys and values are cached
  after the q/k norms and the rotary embedding (a token's position never changes). The text
  tokens come first in the joint sequence; in the single-stream blocks the image rows are the
  last ``M`` of the sequence.
- SD3 / SD3.5 (``Attention`` with ``JointAttnProcessor2_0``, the joint attention and SD3.5's
  second, image-only attention): keys and values are cached after the per-head q/k norms.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

__all__ = ["RASFluxAttnProcessor", "RASJointAttnProcessor", "use_ras_attention"]

_LOCK = threading.Lock()
_STATE = "_ras_attention_installed"  # on the transformer: [users, {module name: replaced processor}]


def _kv_on(ras_kv) -> bool:
    return ras_kv is not None and ras_kv.active


def _cached(ras_kv, attn, name: str, image: torch.Tensor, heads_dim: int) -> torch.Tensor:
    """Store (dense) or fill (sparse) the image rows ``image [b, M, H, Dh]``; returns the keys/values to attend to."""
    b, m = image.shape[0], image.shape[1]
    flat = image.reshape(b, m, -1)
    if ras_kv.mode == "refresh":
        ras_kv.store(attn, name, flat)
        return image
    return ras_kv.fill(attn, name, flat).view(b, ras_kv.num_tokens, -1, heads_dim)


class RASFluxAttnProcessor:
    """FLUX attention with RAS's K/V cache; without an active ``ras_kv`` it is ``fallback``."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ras_kv=None):
        if not _kv_on(ras_kv):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
            enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
            enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        m = ras_kv.num_tokens if ras_kv.idx is None else ras_kv.idx.shape[-1]
        text = key.shape[1] - m
        key = torch.cat([key[:, :text], _cached(ras_kv, attn, "k", key[:, text:], attn.head_dim)], dim=1)
        value = torch.cat([value[:, :text], _cached(ras_kv, attn, "v", value[:, text:], attn.head_dim)], dim=1)
        if attention_mask is not None:
            raise ValueError("RAS's K/V cache does not take an attention mask (token_bucket padding)")
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            enc_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(enc_out.contiguous())
        return out


class RASJointAttnProcessor:
    """SD3's joint (and SD3.5's image-only) attention with RAS's K/V cache; otherwise ``fallback``."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, ras_kv=None):
        if not _kv_on(ras_kv):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask)
        b = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, head_dim)
        key = key.view(b, -1, attn.heads, head_dim)
        value = value.view(b, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key = _cached(ras_kv, attn, "k", key, head_dim)
        value = _cached(ras_kv, attn, "v", value, head_dim)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(b, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        m = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            out, enc = out[:, :m], out[:, m:]
            if not attn.context_pre_only:
                enc = attn.to_add_out(enc)
            return attn.to_out[1](attn.to_out[0](out)), enc
        return attn.to_out[1](attn.to_out[0](out))


def _targets(transformer):
    """``(name, module, RAS processor class)`` of every attention module RAS can cache."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    out = []
    for name, module in transformer.named_modules():
        if isinstance(module, FluxAttention):
            if type(module.processor) is not FluxAttnProcessor:
                raise ValueError(f"RAS needs the stock FluxAttnProcessor on {name}, found "
                                 f"{type(module.processor).__name__} (remove the other processor first)")
            out.append((name, module, RASFluxAttnProcessor))
        elif isinstance(module, Attention) and isinstance(getattr(module, "processor", None), JointAttnProcessor2_0):
            out.append((name, module, RASJointAttnProcessor))
    return out


@contextlib.contextmanager
def use_ras_attention(transformer):
    """``with use_ras_attention(transformer): ...``: the RAS processors on every FLUX / SD3 attention module.

    ``ValueError`` (changing nothing) when the transformer has no such module, a FLUX module
    carries a non-stock processor, or context parallelism is enabled (the cache rows would be
    split across ranks).
    """
    with _LOCK:
        state = getattr(transformer, _STATE, None)
        if state is None:
            if getattr(transformer, "_parallel_config", None) is not None:
                raise ValueError("RAS's K/V cache does not support context parallelism")
            targets = _targets(transformer)
            if not targets:
                raise ValueError(f"{type(transformer).__name__} has no FLUX or SD3 attention module RAS can cache")
            replaced = {}
            for name, module, cls in targets:
                replaced[name] = module.processor
                module.set_processor(cls(module.processor))
            state = [0, replaced]
            setattr(transformer, _STATE, state)
        state[0] += 1
    try:
        yield transformer
    finally:
        with _LOCK:
            state[0] -= 1
            if state[0] == 0:
                modules = dict(transformer.named_modules())
                for name, proc in state[1].items():
                    modules[name].set_processor(proc)
                delattr(transformer, _STATE)
