"""Sigma schedules (docs/method.md section 6 tables) and token choice (section 4)."""

import math

import pytest
import torch

from jit_sampler.anchors import (activate_tokens, checkerboard_lattice, complement, fit_to_budget, initial_anchors,
                                 merge_active, stride_lattice)
from jit_sampler.schedule import beta_cdf, beta_ppf, beta_sigmas, linear_sigmas, stage_layout

TABLE_11 = [1.0000, .9973, .9863, .9643, .9290, .8779, .8081, .7149, .5907, .4184, .0909, 0.0]
TABLE_18 = [1.0000, .9992, .9959, .9894, .9792, .9646, .9454, .9209, .8906, .8540, .8103, .7584, .6972, .6247,
            .5382, .4325, .2964, .0556, 0.0]


@pytest.mark.parametrize("n, table", [(11, TABLE_11), (18, TABLE_18)])
def test_beta_sigma_tables(n, table):
    s = beta_sigmas(n, 1.4, 0.425)
    assert len(s) == n + 1
    assert [round(v, 4) for v in s] == pytest.approx(table, abs=1e-12)
    assert all(b < a for a, b in zip(s, s[1:]))


def test_beta_ppf_inverts_cdf():
    for a, b in ((1.4, 0.425), (1.4, 0.42), (0.5, 0.5), (2.0, 3.0)):
        for q in (1e-6, 0.01, 0.3, 0.5, 0.9, 0.999):
            x = beta_ppf(q, a, b)
            assert beta_cdf(x, a, b) == pytest.approx(q, rel=1e-10, abs=1e-13)
        # Near 1 the CDF of beta < 1 is steep ((1-x)^beta): x is exact to float64, the CDF to ~1e-7.
        assert beta_cdf(beta_ppf(0.999999, a, b), a, b) == pytest.approx(0.999999, abs=1e-6)
    # Closed forms: Beta(1, 1) is uniform; Beta(a, 1) has CDF x^a.
    assert beta_ppf(0.3, 1.0, 1.0) == pytest.approx(0.3, abs=1e-14)
    assert beta_ppf(0.3, 2.0, 1.0) == pytest.approx(math.sqrt(0.3), abs=1e-14)
    assert beta_ppf(0.0, 1.4, 0.4) == 0.0 and beta_ppf(1.0, 1.4, 0.4) == 1.0


def test_other_schedules_and_layout():
    assert beta_sigmas(1) == [1.0, 0.0]
    assert linear_sigmas(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert stage_layout(18, (0.4, 0.65, 1.0)) == [0] * 7 + [1] * 4 + [2] * 7
    assert stage_layout(11, (0.4, 0.65, 1.0)) == [0] * 4 + [1] * 3 + [2] * 4
    with pytest.raises(ValueError):
        beta_sigmas(0)


def _grid_mask(idx, h, w):
    m = torch.zeros(h * w, dtype=torch.bool)
    m[idx] = True
    return m.view(h, w)


def test_checkerboard_counts_and_structure():
    assert checkerboard_lattice(64, 64).numel() == 1213
    assert checkerboard_lattice(32, 32).numel() == 349
    m = _grid_mask(checkerboard_lattice(7, 13), 7, 13)
    assert m[0].all() and m[-1].all() and m[:, 0].all() and m[:, -1].all()
    assert m[2, 2] and m[2, 4] and not m[1, 1] and not m[2, 3] and not m[3, 2]


def test_stride_lattice():
    idx = stride_lattice(10, 10, 0.1)  # stride int(sqrt(10)) = 3: rows/cols 0, 3, 6, 9
    assert idx.numel() == 16
    idx = stride_lattice(8, 8, 0.25)  # stride 2: 0, 2, 4, 6 + last 7
    assert idx.numel() == 25 and 63 in idx.tolist()


@pytest.mark.parametrize("budget", [1, 100, 349, 500, 1024])
def test_fit_to_budget(budget):
    base = checkerboard_lattice(32, 32)
    out = fit_to_budget(base, 1024, budget, torch.Generator().manual_seed(3))
    assert out.numel() == budget and out.dtype == torch.int64
    assert torch.equal(out, out.unique())  # sorted and unique
    sb, so = set(base.tolist()), set(out.tolist())
    assert (so <= sb) if budget <= len(sb) else (sb <= so)
    again = fit_to_budget(base, 1024, budget, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_initial_anchors_policies_and_seed():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    shared = initial_anchors(32, 32, 327, generator=g(0))
    assert shared.shape == (327,)
    per = initial_anchors(32, 32, 327, batch_size=3, generator=g(0))
    assert per.shape == (3, 327)
    assert not torch.equal(per[0], per[1])  # independent draws per sample
    assert torch.equal(per, initial_anchors(32, 32, 327, batch_size=3, generator=g(0)))
    assert not torch.equal(shared, initial_anchors(32, 32, 327, generator=g(1)))
    listed = initial_anchors(32, 32, 327, batch_size=2, generator=[g(5), g(6)])
    assert torch.equal(listed[1], initial_anchors(32, 32, 327, generator=g(6)))
    assert initial_anchors(8, 8, 20, grid="stride", generator=g(0)).numel() == 20


def test_complement_and_merge():
    a = torch.tensor([0, 3, 5])
    assert complement(a, 7).tolist() == [1, 2, 4, 6]
    ab = torch.tensor([[0, 3, 5], [1, 2, 6]])
    assert complement(ab, 7).tolist() == [[1, 2, 4, 6], [0, 3, 4, 5]]
    assert merge_active(a, torch.tensor([4, 1])).tolist() == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("ita", [True, False])
def test_activate_tokens_shapes_and_disjointness(ita):
    h, w, b = 8, 9, 2
    n = h * w
    v = torch.randn(b, n, 4, generator=torch.Generator().manual_seed(0))
    shared = initial_anchors(h, w, 20, generator=torch.Generator().manual_seed(1))
    new = activate_tokens(v, shared, 15, h, w, ita=ita)
    assert new.shape == (15,) and not set(new.tolist()) & set(shared.tolist())
    per = initial_anchors(h, w, 20, batch_size=b, generator=torch.Generator().manual_seed(1))
    newp = activate_tokens(v, per, 15, h, w, ita=ita)
    assert newp.shape == (b, 15)
    for r in range(b):
        assert not set(newp[r].tolist()) & set(per[r].tolist())
    rest = activate_tokens(v, shared, n - 20, h, w, ita=ita)  # last transition: everything left
    assert sorted(rest.tolist() + shared.tolist()) == list(range(n))


def test_ita_picks_high_variance_tokens():
    h = w = 8
    v = torch.zeros(1, 64, 2)
    v[0, 27, :] = 5.0  # one spike at (3, 3): its 3x3 neighbourhood has the highest local variance
    active = torch.tensor([0, 7, 56, 63])
    new = activate_tokens(v, active, 9, h, w, ita=True)
    rows, cols = new // 8, new % 8
    assert ((rows - 3).abs() <= 1).all() and ((cols - 3).abs() <= 1).all()
