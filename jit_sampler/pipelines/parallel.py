"""JiT under diffusers' context parallelism (Ulysses): the checks and the layout it needs.

diffusers splits the *sequence* of one image over the ``W`` ranks of a context-parallel
transformer (``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=W))``):
its plan for FLUX.1 / FLUX.2 cuts ``hidden_states`` and ``encoder_hidden_states`` (and their
position ids) into ``W`` equal contiguous chunks, and the Ulysses all-to-all needs them equal.
JiT changes the image sequence length per stage, so a JiT run is splittable only when

- every stage's image token count (after ``token_bucket`` padding, if any) divides by ``W``, and
- the text length of every branch (cond, and uncond with true CFG) divides by ``W``.

:func:`check_context_parallel` checks both before any model runs (the pipelines call it after
``check_inputs`` and again before the first transformer call) and says what to
set (``JiTConfig(token_multiple=W)``, or a ``token_bucket`` that is a multiple of ``W``). JiT does
not round the budgets silently: a config means the same anchor sets whatever ``W`` is, so the
image of a ``W``-rank run equals the one-process image of the *same* config (docs/parallelism.md).

Padding masks (``token_bucket``): after the Ulysses all-to-all every rank attends over the full
sequence, but in the order "rank 0's text, rank 0's image chunk, rank 1's text, ...", because
the FLUX processors put each rank's text chunk before its image chunk. A key-padding mask in
plain "text, image, padding" order would mask the wrong keys as soon as the padding is longer
than the last rank's chunk; :func:`padding_keep` builds it in the all-to-all order instead.

diffusers' ``ulysses_anything`` / ``ring_anything`` modes split any length (uneven chunks), so the
divisibility check is skipped there. Ring attention with a padding mask is refused
(``NotImplementedError``): ring passes key chunks around and its kernels take no general mask.

Nothing here sets up process groups or devices. On a CPU-only machine diffusers maps rank ``r``
to device ``r % torch.accelerator.device_count()``, which is ``0 % 0``; tests patch
``torch.accelerator.device_count`` to return 1 in their worker processes (``tests/pipelines/_cp_jit_worker.py``).
"""

from __future__ import annotations

import torch

__all__ = ["check_context_parallel", "context_parallel_config", "context_parallel_degree", "padding_keep",
           "plan_wants_batched_ids"]


def context_parallel_config(transformer):
    """The ``ContextParallelConfig`` diffusers' ``enable_parallelism`` put on ``transformer``, or ``None``.

    Tensor parallelism alone (no sequence split) gives ``None``.
    """
    config = getattr(transformer, "_parallel_config", None)
    if config is None:
        return None
    if hasattr(config, "context_parallel_config"):  # a ParallelConfig (diffusers' normal case)
        return config.context_parallel_config
    if hasattr(config, "ulysses_degree") or hasattr(config, "ring_degree"):  # a bare ContextParallelConfig
        return config
    return None


def _degrees(cp) -> tuple[int, int]:
    return int(getattr(cp, "ring_degree", None) or 1), int(getattr(cp, "ulysses_degree", None) or 1)


def context_parallel_degree(transformer) -> int:
    """``W``: how many ranks share one sequence (``ring_degree * ulysses_degree``; 1 without context parallelism)."""
    cp = context_parallel_config(transformer)
    if cp is None:
        return 1
    ring, ulysses = _degrees(cp)
    return ring * ulysses


def _splits_anything(cp) -> bool:
    return bool(getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False))


def plan_wants_batched_ids(transformer) -> bool:
    """Whether the transformer's context-parallel plan splits ``img_ids`` as a 3-D ``[B, N, D]`` tensor.

    FLUX.2 (``Flux2Transformer2DModel``) does; it reads row 0 of 3-D ids, so ``[1, N, D]`` ids
    give the same result as ``[N, D]`` without parallelism, while 2-D ids would be left unsplit
    under it (diffusers warns and the shapes then disagree). FLUX.1's plan splits 2-D ids.
    """
    plan = getattr(transformer, "_cp_plan", None)
    entry = plan.get("", {}).get("img_ids") if isinstance(plan, dict) else None
    return getattr(entry, "expected_dims", None) == 3


def _advice(world: int) -> str:
    return (f"set JiTConfig(token_multiple={world}) (budgets rounded up to a multiple of {world} with real tokens), "
            f"or token_bucket to a multiple of {world}; see docs/parallelism.md")


def check_context_parallel(transformer, token_counts, text_lengths, *, token_bucket: int = 0) -> int:
    """Refuse a JiT run that the transformer's context parallelism cannot split; returns ``W``.

    Args:
        transformer: the (possibly context-parallel) transformer.
        token_counts: the image tokens per stage (``JiTConfig.token_counts(N)``; the last is ``N``).
        text_lengths: the text length of every branch the run evaluates (cond, uncond).
        token_bucket: the config's ``token_bucket`` (the transformer then sees the counts padded
            up to a multiple of it).

    Raises ``ValueError`` (a count or a text length not divisible by ``W``) or
    ``NotImplementedError`` (``token_bucket`` with ring attention). Does nothing without
    context parallelism or in diffusers' ``ulysses_anything`` / ``ring_anything`` modes (which
    split any length).
    """
    cp = context_parallel_config(transformer)
    if cp is None:
        return 1
    ring, ulysses = _degrees(cp)
    world = ring * ulysses
    if token_bucket and ring > 1:
        raise NotImplementedError(f"token_bucket pads with an attention mask, which ring attention (ring_degree="
                                  f"{ring}) does not take; use token_multiple={world} instead of token_bucket")
    if world == 1 or _splits_anything(cp):
        return world
    seen = [c + (-c % token_bucket if token_bucket else 0) for c in token_counts]
    bad = [(c, s) for c, s in zip(token_counts, seen) if s % world]
    if bad:
        what = ", ".join(f"{c}" if c == s else f"{c} (padded to {s})" for c, s in bad)
        raise ValueError(f"context parallelism over {world} ranks splits the image tokens into {world} equal chunks, "
                         f"but JiT's stage token counts {what} (of {list(seen)}) are not divisible by {world}: "
                         f"{_advice(world)}")
    bad_text = sorted({int(t) for t in text_lengths if int(t) % world})
    if bad_text:
        raise ValueError(f"context parallelism over {world} ranks splits the text tokens into {world} equal chunks, "
                         f"but the text length {bad_text} is not divisible by {world}: pad or truncate the prompt "
                         f"embeddings (max_sequence_length) to a multiple of {world}")
    return world


def padding_keep(text: int, tokens: int, pad: int, transformer, device=None) -> torch.Tensor:
    """The key-padding mask ``[text + tokens + pad]`` (bool, ``False`` on the padding) in the key order attention sees.

    Without context parallelism that is "text, image tokens, padding". Under Ulysses over ``W``
    ranks each rank holds chunk ``r`` of the text and chunk ``r`` of the padded image sequence
    (text first), and the all-to-all concatenates the ranks in order, so the mask is the
    concatenation over ``r`` of ``[text chunk r (kept), image chunk r (kept except padding)]``.
    Chunks are ``torch.tensor_split``'s, which are the equal chunks of the even split and the
    chunks of diffusers' ``ulysses_anything`` split.
    """
    image = torch.ones(tokens + pad, dtype=torch.bool, device=device)
    image[tokens:] = False
    text_keep = torch.ones(text, dtype=torch.bool, device=device)
    cp = context_parallel_config(transformer)
    world = context_parallel_degree(transformer)
    if cp is None or world == 1:
        return torch.cat([text_keep, image])
    parts = []
    for t, i in zip(text_keep.tensor_split(world), image.tensor_split(world)):
        parts += [t, i]
    return torch.cat(parts)
