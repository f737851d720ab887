"""Choosing the active tokens (docs/method.md section 4): initial anchors and stage transitions.

Index conventions: a token is its row-major position ``n = row * W + col`` on the
``H x W`` grid. Active sets are int64 ``[M]`` (shared by the batch) or ``[B, M]`` (one
set per sample), unique, in one of two orders (``JiTConfig.anchor_order``):

- ``"sorted"``: ascending, so nearest-anchor ties resolve to the lower token index;
- ``"insertion"``: the published pipeline's order: the initial lattice row-major, then
  the random fill in draw order, then each transition's picks in the order chosen (ITA:
  descending importance; the last transition: the rest row-major), so ties resolve to
  the earlier-activated anchor.

The dense stage always uses ``arange(N)``.

Every random draw uses the caller's ``torch.Generator`` (or a list of them, one per
sample), so a seed reproduces the anchors bit for bit.
"""

from __future__ import annotations

import math

import torch

import jit_kernels as jk

__all__ = [
    "checkerboard_lattice",
    "stride_lattice",
    "fit_to_budget",
    "initial_anchors",
    "activate_tokens",
    "merge_active",
    "complement",
]


def checkerboard_lattice(height: int, width: int, device=None) -> torch.Tensor:
    """Even row & even column cells plus the whole border: sorted int64 ``[K]``.

    1213 of 4096 tokens at 64 x 64, 349 of 1024 at 32 x 32.
    """
    r = torch.arange(height, device=device)[:, None]
    c = torch.arange(width, device=device)[None, :]
    mask = ((r % 2 == 0) & (c % 2 == 0)) | (r == 0) | (r == height - 1) | (c == 0) | (c == width - 1)
    return mask.flatten().nonzero().flatten()


def stride_lattice(height: int, width: int, rho: float, device=None) -> torch.Tensor:
    """Plain stride grid: rows/cols ``0, s, 2s, ...`` plus the last row/col, ``s = max(1, int(sqrt(1/rho)))``."""
    s = max(1, int(math.sqrt(1.0 / rho)))
    rows = sorted(set(range(0, height, s)) | {height - 1})
    cols = sorted(set(range(0, width, s)) | {width - 1})
    rr = torch.tensor(rows, device=device)[:, None]
    cc = torch.tensor(cols, device=device)[None, :]
    return (rr * width + cc).flatten().sort().values


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _generator_for(generator, b: int):
    """The generator of sample ``b`` (a list gives one per sample; a single one is shared)."""
    if isinstance(generator, (list, tuple)):
        return generator[b]
    return generator


def fit_to_budget(base: torch.Tensor, num_tokens: int, budget: int, generator: torch.Generator | None = None,
                  *, order: str = "sorted") -> torch.Tensor:
    """Fit a sorted index set ``base [K]`` to exactly ``budget`` tokens: int64 ``[budget]``.

    Short: add ``budget - K`` tokens drawn uniformly (without replacement) from the rest.
    Over: keep a uniformly random ``budget`` of ``base``. Draws come from ``generator``.
    ``order="sorted"`` returns the set ascending; ``"insertion"`` returns ``base``'s kept
    tokens in their order, then the added ones in draw order.
    """
    if not 1 <= budget <= num_tokens:
        raise ValueError(f"budget must be in [1, {num_tokens}], got {budget}")
    device = base.device
    k = base.numel()
    if k == budget:
        return base.clone()
    gdev = _gen_device(generator)
    if k > budget:
        keep = torch.randperm(k, generator=generator, device=gdev)[:budget].to(device)
        return base[keep.sort().values] if order == "insertion" else base[keep].sort().values
    rest = complement(base, num_tokens)
    pick = torch.randperm(rest.numel(), generator=generator, device=gdev)[: budget - k].to(device)
    out = torch.cat([base, rest[pick]])
    return out if order == "insertion" else out.sort().values


def initial_anchors(
    height: int,
    width: int,
    budget: int,
    *,
    grid: str = "checkerboard",
    batch_size: int | None = None,
    generator=None,
    device=None,
    order: str = "sorted",
) -> torch.Tensor:
    """The static anchors of the sparsest stage.

    Returns int64 ``[budget]`` (shared; ``batch_size=None``) or ``[B, budget]`` (one
    fitted draw per sample, from ``generator[b]`` when a list is given, else sequentially
    from the one generator), in ``order`` (see the module docstring).
    """
    n = height * width
    if grid == "checkerboard":
        base = checkerboard_lattice(height, width, device)
    elif grid == "stride":
        base = stride_lattice(height, width, budget / n, device)
    else:
        raise ValueError(f"grid must be 'checkerboard' or 'stride', got {grid!r}")
    if batch_size is None:
        return fit_to_budget(base, n, budget, _generator_for(generator, 0), order=order)
    return torch.stack([fit_to_budget(base, n, budget, _generator_for(generator, b), order=order)
                        for b in range(batch_size)])


def complement(active: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sorted tokens not in ``active``: ``[M] -> [N - M]`` or ``[B, M] -> [B, N - M]``."""
    if active.dim() == 1:
        mask = torch.ones(num_tokens, dtype=torch.bool, device=active.device)
        mask[active] = False
        out = mask.nonzero().flatten()
    else:
        b = active.shape[0]
        mask = torch.ones(b, num_tokens, dtype=torch.bool, device=active.device)
        mask.scatter_(1, active, False)
        # Equal counts per row, so the row-major nonzero list reshapes to [B, N - M].
        out = mask.nonzero()[:, 1].reshape(b, num_tokens - active.shape[1])
    return out


def merge_active(active: torch.Tensor, new: torch.Tensor, *, order: str = "sorted") -> torch.Tensor:
    """Union of disjoint sets: ``[M] + [R] -> [M + R]`` (or per sample ``[B, .]``): sorted, or
    with ``order="insertion"`` ``active`` followed by ``new`` as given."""
    out = torch.cat([active, new], dim=-1)
    return out if order == "insertion" else out.sort(dim=-1).values


def _distance_score(active: torch.Tensor, nearest: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Squared grid distance of every token to its nearest active token: fp32 ``[B or 1, N]``.

    Used when ITA is off: it fills the largest holes first, a content-free refinement of
    the lattice. ``nearest`` is the stage's nearest-anchor map (positions into ``active``).
    """
    act = active if active.dim() == 2 else active[None]
    near = nearest if nearest.dim() == 2 else nearest[None]
    tok = torch.gather(act, 1, near)  # token index of the nearest anchor, [B, N]
    n = torch.arange(height * width, device=active.device)[None]
    dr = (n // width - tok // width).float()
    dc = (n % width - tok % width).float()
    return dr * dr + dc * dc


def activate_tokens(
    v_field: torch.Tensor | None,
    active: torch.Tensor,
    count: int,
    height: int,
    width: int,
    *,
    ita: bool = True,
    nearest: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Which ``count`` inactive tokens join the active set at a transition.

    ``v_field [B, N, C]`` is the previous step's lifted velocity; ``active`` int64 ``[M]``
    (shared policy: the batch-mean importance picks one set) or ``[B, M]`` (per sample).
    With ``ita=False`` the tokens farthest from the current anchors are taken (needs the
    stage's ``nearest`` map). Returns int64 ``[count]`` or ``[B, count]`` (unsorted: best first).
    ``validate=False``: the caller built ``active`` itself (the sampler does); the kernels do not
    check its values (see :func:`jit_kernels.gather_tokens`).
    """
    n = height * width
    if count == n - active.shape[-1]:
        # The last transition adds everything left: no scoring needed.
        return complement(active, n)
    if ita:
        score = jk.token_importance(v_field, height, width, backend=backend)  # [B, N]
    else:
        if nearest is None:
            nearest = jk.nearest_anchor_map(active, height, width, backend=backend, validate=validate)
        score = _distance_score(active, nearest, height, width)
    if active.dim() == 1:
        score = score.mean(0, keepdim=True)  # shared set: batch-mean importance
        return jk.select_new_tokens(score, active, count, backend=backend, validate=validate)[0]
    return jk.select_new_tokens(score, active, count, backend=backend, validate=validate)
