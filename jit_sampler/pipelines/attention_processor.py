"""A diffusers attention processor for FLUX that runs :func:`jit_kernels.anchor_attention`.

:class:`AnchorAttnProcessor` is a drop-in replacement for diffusers' ``FluxAttnProcessor`` in
the double-stream (``FluxTransformerBlock``) and single-stream (``FluxSingleTransformerBlock``)
blocks of ``FluxTransformer2DModel``: the same projections (so LoRA/PEFT-wrapped layers and
the ``joint_attention_kwargs={"scale": s}`` LoRA scale work unchanged), the same q/k RMS
norms, text tokens first, the same output projections; only "rotate q and k, then SDPA" is
replaced by the fused op, which rotates inside the kernel.

Attention masks: a pure key-padding mask (bool ``[B, L]`` / ``[B, 1, 1, L]`` whose ``True``
entries are a prefix of every row, or the additive ``0 / -inf`` equivalent) becomes the op's
``key_lengths``; valid rows are then exactly what the stock processor gives, padded query
rows are zero (the stock processor gives them an attention output over the valid keys;
they are padding either way). Any other mask or a missing rotary embedding falls back to
the processor that was installed before.

Reading a mask's lengths is a host sync, so it is done once per distinct mask, not once per
attention layer: the result is cached on the mask tensor's identity and version counter (a
weak reference; an in-place change of the mask recomputes it), shared by every processor.
A forward with a mask therefore syncs at most once for it, and a caller that passes the same
mask tensor again (``FluxVelocity`` with ``token_bucket`` does, for every step of a stage)
not at all. Inference tensors (made under ``torch.inference_mode``) have no version counter
and are converted on every call.

Context parallelism (diffusers' ``enable_parallelism`` with a ``ContextParallelConfig``:
Ulysses / ring) is refused with a ``ValueError``: the fused op would attend only to the
rank's shard of the sequence. :func:`install_anchor_attention` refuses a transformer that
already has it, and the processor refuses to run once it has been enabled after the
installation (:func:`remove_anchor_attention` then hands the parallel config to the restored
stock processors). Tensor parallelism, which diffusers keeps out of the processors (each rank
runs ordinary attention over its own heads), is not affected.

``install_anchor_attention(transformer)`` swaps every stock ``FluxAttnProcessor`` (exact
type; IP-adapter and custom processors are left alone) and remembers the previous objects;
``remove_anchor_attention(transformer)`` puts those exact objects back.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

import jit_kernels as jk

__all__ = [
    "AnchorAttnProcessor",
    "install_anchor_attention",
    "remove_anchor_attention",
    "use_anchor_attention",
    "key_lengths_from_mask",
]

_PREVIOUS = "_jit_anchor_attention_previous"


def _flux_classes():
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    return FluxAttention, FluxAttnProcessor


def _qkv_projections(attn, hidden_states, encoder_hidden_states):
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


def key_lengths_from_mask(mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor | None:
    """int64 ``[B]`` key lengths if ``mask`` is a pure key-padding (prefix) mask, else ``None``.

    Accepted: bool ``[L]``, ``[B, L]``, ``[B, 1, L]``, ``[B, 1, 1, L]`` (``True`` = attend) and
    float masks of the same shapes holding only ``0`` (attend) and ``-inf`` (ignore). Each
    row must be ``True`` on a prefix of at least one token and ``False`` after it. Reads the
    mask on the host once (one device sync on CUDA).
    """
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] != seq_len:
        return None
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    elif mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.dim() == 1:
        mask = mask[None]
    if mask.dim() != 2 or mask.shape[0] not in (1, batch):
        return None
    if mask.dtype == torch.bool:
        keep, ok = mask, None
    elif mask.is_floating_point():
        keep = mask == 0
        ok = (keep | (mask == float("-inf"))).all()  # else a real additive bias, not a padding mask
    else:
        return None
    lengths = keep.sum(dim=1)
    prefix = torch.arange(seq_len, device=mask.device)[None, :] < lengths[:, None]
    valid = (prefix == keep).all() & (lengths >= 1).all()
    if not bool(valid if ok is None else valid & ok):  # the one host read of the conversion
        return None
    return lengths.expand(batch).to(torch.int64).contiguous()


# ---------------------------------------------------------------- key lengths, once per mask
_LENGTHS_CACHE: dict = {}  # id(mask) -> (weakref(mask), version, batch, seq_len, lengths | None)
_LENGTHS_CACHE_SIZE = 16


def _forget(key, ref) -> None:
    entry = _LENGTHS_CACHE.get(key)
    if entry is not None and entry[0] is ref:
        _LENGTHS_CACHE.pop(key, None)


def _cached_key_lengths(mask, batch: int, seq_len: int):
    """:func:`key_lengths_from_mask`, computed once per (mask tensor, version, batch, length)."""
    if (torch.compiler.is_compiling() or not isinstance(mask, torch.Tensor) or mask.is_inference()
            or mask.shape[-1] != seq_len):
        return key_lengths_from_mask(mask, batch, seq_len)
    key, version = id(mask), mask._version
    entry = _LENGTHS_CACHE.get(key)
    if entry is not None and entry[0]() is mask and entry[1:4] == (version, batch, seq_len):
        return entry[4]
    lengths = key_lengths_from_mask(mask, batch, seq_len)
    _LENGTHS_CACHE.pop(key, None)
    while len(_LENGTHS_CACHE) >= _LENGTHS_CACHE_SIZE:
        _LENGTHS_CACHE.pop(next(iter(_LENGTHS_CACHE)), None)  # the oldest
    ref = weakref.ref(mask, lambda r, k=key: _forget(k, r))
    _LENGTHS_CACHE[key] = (ref, version, batch, seq_len, lengths)
    return lengths


# ---------------------------------------------------------------- context parallelism
def _context_parallel(config) -> bool:
    """Whether a diffusers parallel config (``ParallelConfig`` or ``ContextParallelConfig``) splits the sequence."""
    if config is None:
        return False
    try:
        from diffusers.models._modeling_parallel import ParallelConfig, TensorParallelConfig
    except ImportError:  # another diffusers layout: anything set there is taken as context parallelism
        return True
    if isinstance(config, ParallelConfig):
        return config.context_parallel_config is not None
    return not isinstance(config, TensorParallelConfig)  # a ContextParallelConfig (or unknown): refuse


_CP_REASON = ("the fused anchor attention attends only to the tokens of its own rank, so under diffusers' context "
              "parallelism (enable_parallelism with a ContextParallelConfig) every rank would attend to its shard "
              "of the sequence only")


class AnchorAttnProcessor:
    """``FluxAttnProcessor`` with rotary + attention fused in :func:`jit_kernels.anchor_attention`.

    Args:
        backend: the ``jit_kernels`` backend (``None``: the global default, ``auto``).
        fallback: the processor used for inputs the op does not take (an arbitrary mask, no
            rotary embedding); default a fresh ``FluxAttnProcessor``.
        devices: device types on which the fused op runs; tensors elsewhere take the
            fallback. Default CPU only: on an H100 the Triton kernel measured 1.1-1.5x
            rotary + PyTorch's flash SDPA at 512 + 1310 tokens but 0.61x at 512 + 4096 with
            FLUX's 24 x 128 heads (bf16; benchmarks/NOTES.md), so CUDA is opt-in
            (``devices=("cpu", "cuda")``).

    Raises ``ValueError`` when called with a context-parallel config (set by diffusers'
    ``enable_parallelism`` on this processor or on its fallback).
    """

    # diffusers' set_attention_backend / context parallelism set these on processors.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: str | None = None, fallback=None, devices=("cpu",)):
        if fallback is None:
            fallback = _flux_classes()[1]()
        self.backend = backend
        self.fallback = fallback
        self.devices = tuple(devices)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if _context_parallel(self._parallel_config) or _context_parallel(getattr(self.fallback, "_parallel_config", None)):
            raise ValueError(f"AnchorAttnProcessor: {_CP_REASON}; call remove_anchor_attention(transformer) (the "
                             f"stock processors it restores take the parallel config) or do not use anchor "
                             f"attention with context parallelism")
        lengths = None
        joint = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        usable = image_rotary_emb is not None and hidden_states.device.type in self.devices
        if usable and attention_mask is not None:
            lengths = _cached_key_lengths(attention_mask, hidden_states.shape[0], joint)
            usable = lengths is not None
        if not usable:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query, key, value, encoder_query, encoder_key, encoder_value = _qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        cos, sin = image_rotary_emb
        # validate=False: lengths from key_lengths_from_mask are in [1, L] by construction (it checked the
        # mask), so no per-layer value check (a host sync on CUDA).
        out = jk.anchor_attention(query, key, value, cos, sin, key_lengths=lengths, backend=self.backend,
                                  validate=False)
        hidden_states = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [text, hidden_states.shape[1] - text], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def install_anchor_attention(transformer, backend: str | None = None, devices=("cpu",)) -> int:
    """Swap every stock ``FluxAttnProcessor`` of ``transformer`` for an :class:`AnchorAttnProcessor`.

    ``backend`` and ``devices`` are passed to the processors. Returns the number swapped. The
    replaced objects are kept on the model and restored by :func:`remove_anchor_attention`.
    Installing twice swaps nothing more.

    Raises ``ValueError`` (swapping nothing) when the transformer has diffusers' context
    parallelism enabled: the fused op does not take part in the sequence split.
    """
    flux_attention, flux_processor = _flux_classes()
    configs = [getattr(transformer, "_parallel_config", None)]
    configs += [getattr(getattr(m, "processor", None), "_parallel_config", None) for m in transformer.modules()]
    if any(_context_parallel(c) for c in configs):
        raise ValueError(f"install_anchor_attention: the transformer has context parallelism enabled; {_CP_REASON}. "
                         f"Run it with the stock attention processors")
    previous = getattr(transformer, _PREVIOUS, None)
    if previous is None:
        previous = {}
        setattr(transformer, _PREVIOUS, previous)
    swapped = 0
    for name, module in transformer.named_modules():
        if isinstance(module, flux_attention) and type(module.processor) is flux_processor:
            previous[name] = module.processor
            module.set_processor(AnchorAttnProcessor(backend=backend, fallback=module.processor, devices=devices))
            swapped += 1
    return swapped


def remove_anchor_attention(transformer) -> int:
    """Put back the exact processors :func:`install_anchor_attention` replaced; returns how many.

    What diffusers set on the installed processors since (``_parallel_config`` by
    ``enable_parallelism``, ``_attention_backend`` by ``set_attention_backend``) is handed to
    the restored ones, so they run as if they had been installed all along.
    """
    previous = getattr(transformer, _PREVIOUS, None)
    if not previous:
        if previous is not None:
            delattr(transformer, _PREVIOUS)
        return 0
    modules = dict(transformer.named_modules())
    restored = 0
    for name, proc in previous.items():
        module = modules.get(name)
        if module is not None and isinstance(module.processor, AnchorAttnProcessor):
            mine = vars(module.processor)
            for attr in ("_parallel_config", "_attention_backend"):
                if attr in mine and hasattr(proc, attr):
                    setattr(proc, attr, mine[attr])
            module.set_processor(proc)
            restored += 1
    delattr(transformer, _PREVIOUS)
    return restored


@contextlib.contextmanager
def use_anchor_attention(transformer, backend: str | None = None, enabled: bool = True, devices=("cpu",)):
    """``with use_anchor_attention(transformer): ...`` installs the processor for the block only.

    Only the processors this call swapped are restored, so an outer installation survives.
    """
    if not enabled:
        yield transformer
        return
    before = dict(getattr(transformer, _PREVIOUS, None) or {})
    install_anchor_attention(transformer, backend=backend, devices=devices)
    try:
        yield transformer
    finally:
        previous = getattr(transformer, _PREVIOUS, None) or {}
        mine = {k: v for k, v in previous.items() if k not in before}
        setattr(transformer, _PREVIOUS, mine)
        remove_anchor_attention(transformer)
        if before:
            setattr(transformer, _PREVIOUS, before)
