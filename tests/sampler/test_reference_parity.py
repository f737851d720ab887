"""The reference presets equal an independent transcription of the published loop.

``tests/sampler/_published_loop.py`` is written from docs/method.md sections 2-6 (insertion-ordered
anchor list, ties to the earliest entry, full distance matrix, blend DMF); with the same
initial anchors and DMF noise, ``jit_sample`` under ``"reference"`` / ``"7x-reference"``
must match it to float tolerance, and the sorted-list paper order must not (ties on the
lattice resolve differently), which shows the test can tell the two apart.
"""

import pytest
import torch

import jit_kernels as jk
from jit_kernels import testing as T
from jit_sampler import JiTConfig, beta_sigmas, jit_sample

from tests.sampler._published_loop import lattice, published_loop

H, W, C = 32, 32, 4
N = H * W


def _field(idx: torch.Tensor) -> torch.Tensor:
    r, c = (idx // W).float(), (idx % W).float()
    return torch.stack([torch.sin(0.31 * r + 0.17 * c), torch.cos(0.23 * r - 0.41 * c),
                        torch.sin(0.05 * r * c), torch.cos(0.5 * r)], -1)


def _velocity_packed(x, idx, sigma, step):
    """Token-wise, position-dependent, plus a batch-symmetric mean: equivariant to list order."""
    pos = _field(idx if idx.dim() == 1 else idx[0])
    return 0.6 * x + sigma * torch.tanh(x.roll(1, dims=-1)) + 0.3 * pos + 0.05 * x.mean(dim=1, keepdim=True)


def _velocity_list(x, active, sigma):
    return _velocity_packed(x[None], torch.tensor(active), sigma, None)[0]


def _inputs(preset: str, seed: int = 0):
    cfg = JiTConfig.preset(preset)
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(1, N, C, generator=g)
    eps = torch.randn(1, N, C, generator=g)
    base = lattice(H, W)
    m0 = int(N * cfg.token_ratios[0])
    if m0 <= len(base):  # over budget: drop random lattice tokens, the rest keep their order
        keep = sorted(torch.randperm(len(base), generator=g)[:m0].tolist())
        return cfg, y0, eps, [base[j] for j in keep]
    rest = [t for t in range(N) if t not in set(base)]
    fill = [rest[j] for j in torch.randperm(len(rest), generator=g)[: m0 - len(base)].tolist()]
    return cfg, y0, eps, base + fill


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("preset", ["reference", "7x-reference"])
@pytest.mark.parametrize("backend", [b for b in T.compiled_backends() if b != "triton"] + ["reference"])
def test_reference_preset_equals_the_published_loop(preset, backend):
    cfg, y0, eps, anchors = _inputs(preset)
    sig = beta_sigmas(cfg.total_steps)
    want = published_loop(_velocity_list, y0[0], H, W, sig, cfg.total_steps, cfg.stage_ratios, cfg.token_ratios,
                          anchors, eps[0], relax_steps=cfg.relax_steps)
    run = cfg.replace(init_anchors=torch.tensor(anchors), dmf_noise=eps, backend=backend)
    got, _ = jit_sample(_velocity_packed, y0, H, W, sig, run)
    assert _rel(got[0], want) <= 1e-4
    # The paper's sorted list resolves lattice ties to the lower index: a measurably different run.
    sorted_run = run.replace(anchor_order="sorted")
    other, _ = jit_sample(_velocity_packed, y0, H, W, sig, sorted_run)
    assert _rel(other[0], want) > 1e-3


def test_insertion_order_is_lattice_then_fill_then_ita_then_rest():
    cfg, y0, eps, anchors = _inputs("reference")
    seen = []

    def record(x, idx, sigma, step):
        seen.append(idx.clone())
        return _velocity_packed(x, idx, sigma, step)

    jit_sample(record, y0, H, W, beta_sigmas(cfg.total_steps), cfg.replace(init_anchors=torch.tensor(anchors),
                                                                            dmf_noise=eps))
    m0, m1 = int(N * cfg.token_ratios[0]), int(N * cfg.token_ratios[1])
    first, second, last = seen[0], seen[cfg.stage_ends[0]], seen[-1]
    assert first.tolist() == anchors  # the given list, unsorted
    assert second[:m0].tolist() == anchors and second.numel() == m1
    # the ITA picks follow in descending importance, as select_new_tokens returns them
    picks = second[m0:]
    assert not torch.equal(picks, picks.sort().values)
    assert torch.equal(last, torch.arange(N))  # the dense stage is row-major


def test_generated_insertion_lists_keep_the_lattice_first():
    cfg = JiTConfig.preset("reference")
    seen = []

    def record(x, idx, sigma, step):
        seen.append(idx.clone())
        return 0.5 * x

    jit_sample(record, torch.randn(1, N, C), H, W, beta_sigmas(cfg.total_steps), cfg, torch.Generator().manual_seed(3))
    base = lattice(H, W)
    first = seen[0].tolist()
    assert first[: len(base)] == base and len(set(first)) == len(first) == int(N * cfg.token_ratios[0])
    assert first[len(base):] != sorted(first[len(base):])  # draw order (9 random tokens: unsorted w.h.p.)


def test_nearest_ties_follow_the_list_order():
    # Two anchors equidistant from cell 1 of a 1 x 3 grid: the first listed wins, whatever its index.
    assert jk.nearest_anchor_map(torch.tensor([0, 2]), 1, 3).tolist() == [0, 0, 1]
    assert jk.nearest_anchor_map(torch.tensor([2, 0]), 1, 3).tolist() == [1, 0, 0]


def test_init_anchors_are_checked_before_any_model_call():
    cfg = JiTConfig.preset("reference")
    m0 = int(N * cfg.token_ratios[0])
    calls = []

    def never(x, idx, sigma, step):
        calls.append(step)
        return x

    sig = beta_sigmas(cfg.total_steps)
    y0 = torch.randn(1, N, C)
    good = torch.randperm(N)[:m0]
    for bad, exc in ((good[:-1], ValueError), (torch.cat([good[:-1], good[:1]]), ValueError),
                     (torch.cat([good[:-1], torch.tensor([N])]), IndexError)):
        with pytest.raises(exc):
            jit_sample(never, y0, H, W, sig, cfg.replace(init_anchors=bad))
    with pytest.raises(TypeError):
        cfg.replace(init_anchors=good.tolist())
    with pytest.raises(TypeError):
        cfg.replace(init_anchors=good.int())
    with pytest.raises(ValueError):
        cfg.replace(init_anchors=good[None])  # shared policy takes [M0]
    assert calls == []


@pytest.mark.parametrize("backend", [b for b in T.compiled_backends() if b != "triton"] + ["reference"])
def test_a_lattice_that_fills_the_budget_needs_no_given_anchors(backend):
    """The first budget equals the checkerboard lattice (349 of 32 x 32): the sampler draws no
    anchors, and with the shared noise tensor the run equals the published loop."""
    base = lattice(H, W)
    cfg = JiTConfig.preset("reference", token_ratios=(len(base) / N, 0.62, 1.0), backend=backend)
    assert int(N * cfg.token_ratios[0]) == len(base)
    g = torch.Generator().manual_seed(5)
    y0, eps = torch.randn(1, N, C, generator=g), torch.randn(1, N, C, generator=g)
    sig = beta_sigmas(cfg.total_steps)
    want = published_loop(_velocity_list, y0[0], H, W, sig, cfg.total_steps, cfg.stage_ratios, cfg.token_ratios,
                          base, eps[0], relax_steps=cfg.relax_steps)
    got, _ = jit_sample(_velocity_packed, y0, H, W, sig, cfg.replace(dmf_noise=eps), torch.Generator().manual_seed(9))
    assert _rel(got[0], want) <= 1e-4
