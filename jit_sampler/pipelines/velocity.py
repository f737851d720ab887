"""``FluxVelocity``: run a FLUX-family transformer on the active tokens only.

The adapter between :func:`jit_sampler.jit_sample` (which hands it the active tokens and
their indices) and a diffusers ``FluxTransformer2DModel`` / ``Flux2Transformer2DModel``: it
picks the active rows of the position ids, adds text conditioning, guidance and true CFG,
and keeps diffusers' cache hooks consistent across stage transitions. Every JiT pipeline
builds one of these; nothing here knows about pipelines.
"""

from __future__ import annotations

import contextlib

import torch

import jit_kernels as jk

from ..config import is_int_at_least
from .parallel import check_context_parallel, context_parallel_degree, padding_keep, plan_wants_batched_ids

__all__ = ["FluxVelocity"]


class FluxVelocity:
    """``velocity_fn`` for :func:`~jit_sampler.jit_sample` around a ``FluxTransformer2DModel``.

    Args:
        transformer: the model (any ``FluxTransformer2DModel``-compatible module).
        prompt_embeds: ``[B, T, D_txt]``; pooled_prompt_embeds: ``[B, P]`` (``None`` for FLUX.2,
            which has no pooled text input); text_ids: ``[T, 3]`` (FLUX.2: ``[..., 4]``).
        img_ids: ``[N, 3]`` position ids of all image tokens (row-major grid; FLUX.2: ``[N, 4]``).
        guidance: ``[B]`` embedded guidance or ``None``.
        negative: ``(neg_prompt_embeds, neg_pooled, neg_text_ids)`` for true CFG, or ``None``.
        true_cfg_scale: ``v = v_neg + s * (v_cond - v_neg)`` when ``negative`` is given.
        joint_attention_kwargs: passed to the transformer (e.g. ``{"scale": lora_scale}``).
        image_embeds / negative_image_embeds: IP-adapter embeddings per branch (lists of ``[B, ...]``).
        pre_call: called as ``pre_call(step, sigma)`` before each evaluation (the pipeline
            sets its ``current_timestep`` there).
        ref_tokens / ref_ids: reference-image tokens ``[B, R, C]`` and their position ids
            ``[R, 3|4]`` (FLUX.1 Kontext, FLUX.2 ``image=``), or ``None``. They are appended after
            the active tokens in every call, whatever the stage (references are never made
            sparse), and the output keeps only the active tokens' rows.
        cond_tokens: ``[B, N, C2]`` per-token conditioning concatenated to the latent tokens on
            the channel axis before every forward (FLUX.1 Fill: masked-image latents + mask), or
            ``None``. Its rows follow the active tokens (gathered with the same indices, once per
            stage); the transformer then sees ``C + C2`` input channels and returns ``C``.

    Called as ``(x [B, M, C], active_idx [M] | [B, M], sigma, step) -> v [B, M, C]`` in
    ``x.dtype``. Cond and uncond share the anchor set by construction. A per-sample set
    (``[B, M]``) runs one forward per sample, because diffusers shares ``img_ids`` across
    the batch. ``calls`` counts transformer forwards.

    Cache hooks (``transformer.enable_cache(...)``: First-Block Cache, TaylorSeer, ...) keep
    per-token state from earlier steps. When the number of active tokens changes (a JiT stage
    transition) that state belongs to another token set, so the hooks are reset
    (``_reset_stateful_cache``) and the first step of every stage runs in full; ``cache_resets``
    counts those resets. A cache that lives outside diffusers' hooks (cache-dit, see
    :func:`~jit_sampler.pipelines.cache_dit.enable_cache_dit`) sets a callable
    ``transformer._jit_stage_hook`` while it is active; it is called as ``hook(velocity, active_idx)``
    before the first evaluation of every stage, the first stage included, and its transition
    resets count in ``cache_resets`` too.

    Context parallelism (diffusers' ``enable_parallelism``, Ulysses): the ids are passed in the
    shape the transformer's context-parallel plan splits (FLUX.2: ``[1, M, 4]``, as its stock
    pipeline passes them; ``[M, 4]`` otherwise, which it treats the same), the
    ``token_bucket`` padding mask is laid out in the order the Ulysses all-to-all gives the keys
    (:func:`~jit_sampler.pipelines.parallel.padding_keep`), and a sequence the ranks cannot
    split evenly is refused with a ``ValueError`` before the call (the pipelines check every
    stage before the first call, :func:`~jit_sampler.pipelines.parallel.check_context_parallel`).
    """

    def __init__(self, transformer, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, *, guidance=None,
                 negative=None, true_cfg_scale: float = 1.0, joint_attention_kwargs: dict | None = None,
                 image_embeds=None, negative_image_embeds=None, pre_call=None, backend: str = "auto",
                 token_bucket: int = 0, ref_tokens=None, ref_ids=None,
                 cond_tokens: torch.Tensor | None = None):
        if (ref_tokens is None) != (ref_ids is None):
            raise ValueError("ref_tokens and ref_ids go together (both or neither)")
        if ref_tokens is not None and (ref_tokens.dim() != 3
                                       or tuple(ref_ids.shape) != (ref_tokens.shape[1], img_ids.shape[1])):
            raise ValueError(f"ref_tokens must be [B, R, C] with ref_ids [R, {img_ids.shape[1]}], got "
                             f"{tuple(ref_tokens.shape)} and {tuple(ref_ids.shape)}")
        if not is_int_at_least(token_bucket, 0):
            raise ValueError(f"token_bucket must be an int >= 0 (0 = off), got {token_bucket!r}")
        if token_bucket and "attention_mask" in (joint_attention_kwargs or {}):
            raise ValueError("token_bucket pads with its own attention mask; it cannot be combined with a "
                             "user attention_mask in joint_attention_kwargs")
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.pooled_prompt_embeds = pooled_prompt_embeds
        self.text_ids = text_ids
        self.img_ids = img_ids
        self.guidance = guidance
        self.negative = negative
        self.true_cfg_scale = float(true_cfg_scale)
        self.joint_attention_kwargs = dict(joint_attention_kwargs or {})
        self.image_embeds = image_embeds
        self.negative_image_embeds = negative_image_embeds
        self.pre_call = pre_call
        self.backend = backend
        self.token_bucket = token_bucket
        self.ref_tokens = ref_tokens
        self.ref_ids = ref_ids
        self.calls = 0
        self.cache_resets = 0
        self._ids_key = None
        self._ids = None
        self._last_tokens = None
        if cond_tokens is not None and (not isinstance(cond_tokens, torch.Tensor) or cond_tokens.dim() != 3
                                        or cond_tokens.shape[1] != img_ids.shape[0]):
            raise ValueError(f"cond_tokens must be a [B, N = {img_ids.shape[0]}, C2] tensor or None, got "
                             f"{tuple(cond_tokens.shape) if isinstance(cond_tokens, torch.Tensor) else cond_tokens!r}")
        self.cond_tokens = cond_tokens
        self._cond_key = None
        self._cond = None
        self._masks: dict = {}  # token_bucket key-padding masks, one tensor per (batch, text, tokens, pad, device, W)
        self._batched_ids = plan_wants_batched_ids(transformer)  # FLUX.2 under CP: [1, M, 4] ids

    def _reset_cache_hooks(self) -> bool:
        tr = self.transformer
        if not hasattr(tr, "_reset_stateful_cache"):
            return False
        # enable_cache registers hooks on submodules; disable_cache leaves empty registries.
        if any(getattr(getattr(m, "_diffusers_hook", None), "_hook_order", None) for m in tr.modules()):
            tr._reset_stateful_cache()
            return True
        return False

    def _stage_start(self, active_idx: torch.Tensor, transition: bool) -> None:
        """A new stage (the first, or a change of the active token count): reset every cache."""
        hook = getattr(self.transformer, "_jit_stage_hook", None)
        if hook is not None:
            hook(self, active_idx)
        if transition and (self._reset_cache_hooks() or hook is not None):
            self.cache_resets += 1

    def _ids_for(self, active_idx: torch.Tensor):
        """``img_ids`` rows of the active tokens: ``[M, 3]`` or a list of ``B`` of them; cached per stage."""
        if self._ids_key is not active_idx:
            def rows(idx):
                if self.img_ids.is_floating_point():
                    return jk.gather_tokens(self.img_ids.unsqueeze(0), idx, backend=self.backend)[0]
                return self.img_ids.index_select(0, idx)  # FLUX.2's integer ids

            self._ids = rows(active_idx) if active_idx.dim() == 1 else [rows(r) for r in active_idx]
            self._ids_key = active_idx  # the loop keeps one tensor object per stage
        return self._ids

    def _cond_for(self, active_idx: torch.Tensor) -> torch.Tensor:
        """``cond_tokens`` rows of the active tokens ``[B, M, C2]``; gathered once per stage, like the ids."""
        if self._cond_key is not active_idx:
            self._cond = jk.gather_tokens(self.cond_tokens, active_idx, backend=self.backend)
            self._cond_key = active_idx
        return self._cond

    def _padding_mask(self, b: int, text: int, m: int, pad: int, device) -> torch.Tensor:
        """The bool key-padding mask ``[B, 1, 1, text + m + pad]`` (``False`` on the padding), one tensor per shape.

        Under context parallelism the keys are in the Ulysses all-to-all order (``padding_keep``).

        The same tensor object for every step of a stage, so the anchor-attention processor reads
        its key lengths (a host sync) once per stage instead of once per step. Built outside
        inference mode so it has a version counter (the processor's cache needs one); rebuilt if
        anything changed it in place.
        """
        key = (b, text, m, pad, device, context_parallel_degree(self.transformer))
        hit = self._masks.get(key)
        if hit is not None and hit[0]._version == hit[1]:
            return hit[0]
        with torch.inference_mode(False), torch.no_grad():  # a version counter, for the check above
            keep = padding_keep(text, m, pad, self.transformer, device).expand(b, 1, 1, -1).clone()
        if len(self._masks) >= 16:
            self._masks.clear()
        self._masks[key] = (keep, keep._version)
        return keep

    def _forward(self, x, ids, sl, sigma, cond: bool):
        tr = self.transformer
        b, m = x.shape[0], x.shape[1]
        # As FluxPipeline: timestep t = 1000 * sigma in the latent dtype, passed as t / 1000.
        t = torch.full((b,), sigma * 1000.0, device=x.device, dtype=torch.float32).to(x.dtype)
        kwargs = dict(self.joint_attention_kwargs)
        if self.ref_tokens is not None:  # reference tokens after the active ones, in every call
            x = torch.cat([x, self.ref_tokens[sl].to(x.dtype)], 1)
            ids = torch.cat([ids, self.ref_ids], 0)
        n = x.shape[1]
        pad = (-n) % self.token_bucket if self.token_bucket else 0
        text = (self.prompt_embeds if cond else self.negative[0]).shape[1]
        # Under context parallelism: a clear error here instead of diffusers' assert inside the call.
        check_context_parallel(tr, [n + pad], [text], token_bucket=self.token_bucket)
        if pad:
            # Pad to the bucket: zero tokens at a copy of the first position, masked out as keys.
            x = torch.cat([x, x.new_zeros(b, pad, x.shape[2])], 1)
            ids = torch.cat([ids, ids[:1].expand(pad, -1)], 0)
            kwargs["attention_mask"] = self._padding_mask(b, text, n, pad, x.device)
        emb = self.image_embeds if cond else self.negative_image_embeds
        if emb is not None:
            kwargs["ip_adapter_image_embeds"] = [e[sl] for e in emb]
        if cond:
            pe, pooled, tids = self.prompt_embeds, self.pooled_prompt_embeds, self.text_ids
        else:
            pe, pooled, tids = self.negative
        ctx = tr.cache_context("cond" if cond else "uncond") if hasattr(tr, "cache_context") else contextlib.nullcontext()
        extra = {} if pooled is None else {"pooled_projections": pooled[sl]}  # FLUX.2 has no pooled text
        if self._batched_ids and context_parallel_degree(tr) > 1:  # same result; the CP plan splits 3-D ids only
            ids = ids.unsqueeze(0) if ids.dim() == 2 else ids
            tids = tids.unsqueeze(0) if tids.dim() == 2 else tids
        with ctx:
            out = tr(hidden_states=x, timestep=t / 1000, guidance=None if self.guidance is None else self.guidance[sl],
                     encoder_hidden_states=pe[sl], txt_ids=tids, img_ids=ids, joint_attention_kwargs=kwargs,
                     return_dict=False, **extra)[0]
        self.calls += 1
        return out[:, :m] if out.shape[1] != m else out

    def _guided(self, x, ids, sl, sigma):
        v = self._forward(x, ids, sl, sigma, True)
        if self.negative is not None:
            v_neg = self._forward(x, ids, sl, sigma, False)
            v = v_neg + self.true_cfg_scale * (v - v_neg)
        return v

    def __call__(self, x: torch.Tensor, active_idx: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        if self.pre_call is not None:
            self.pre_call(step, sigma)
        tokens = active_idx.shape[-1]
        if tokens != self._last_tokens:
            self._stage_start(active_idx, transition=self._last_tokens is not None)
        self._last_tokens = tokens
        dtype = self.transformer.dtype
        xin = x.to(dtype)
        if self.cond_tokens is not None:  # e.g. Fill: [latent | masked image | mask] on the channel axis
            if self.cond_tokens.shape[0] != x.shape[0]:
                raise ValueError(f"cond_tokens has batch {self.cond_tokens.shape[0]}, the latents {x.shape[0]}")
            dense = active_idx.shape[-1] == self.img_ids.shape[0]
            cond = self.cond_tokens if dense else self._cond_for(active_idx)
            xin = torch.cat([xin, cond.to(dtype)], dim=2)
        if active_idx.shape[-1] == self.img_ids.shape[0]:
            # Dense stage: every token, in grid order (active sets are kept sorted).
            return self._guided(xin, self.img_ids, slice(None), sigma).to(x.dtype)
        ids = self._ids_for(active_idx)
        if active_idx.dim() == 1:
            return self._guided(xin, ids, slice(None), sigma).to(x.dtype)
        outs = [self._guided(xin[b:b + 1], ids[b], slice(b, b + 1), sigma) for b in range(x.shape[0])]
        return torch.cat(outs).to(x.dtype)
