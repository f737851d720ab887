"""The model-agnostic JiT loop: token counts, nested sets, DMF arithmetic, determinism, policies, FLOPs."""

import pytest
import torch

import jit_kernels as jk
from jit_sampler import JiTConfig, beta_sigmas, jit_sample
from jit_sampler.report import FLUX1_DEV_CONFIG, flop_summary, flux_transformer_flops
from jit_sampler.sampler import make_plan

H, W, C = 12, 10, 4
N = H * W


class Recorder:
    """A velocity_fn with some spatial structure that records what the loop gave it."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, idx, sigma, step):
        self.calls.append((x.clone(), idx.clone(), sigma, step))
        return 0.7 * x + torch.tanh(x.roll(1, dims=-1)) * sigma


def _latents(b=1, seed=0):
    return torch.randn(b, N, C, generator=torch.Generator().manual_seed(seed))


def _run(cfg, b=1, seed=0, gen_seed=1, **kw):
    rec = Recorder()
    y, rep = jit_sample(rec, _latents(b, seed), H, W, beta_sigmas(cfg.total_steps), cfg,
                        torch.Generator().manual_seed(gen_seed), **kw)
    return y, rep, rec


def test_token_counts_follow_the_preset():
    cfg = JiTConfig.preset("7x")
    y, rep, rec = _run(cfg)
    m = cfg.token_counts(N)
    assert rep.active_tokens == [m[0]] * 4 + [m[1]] * 3 + [N] * 4
    assert [c[0].shape[1] for c in rec.calls] == rep.active_tokens
    assert rep.model_calls == rep.model_evals == 11
    assert rep.new_tokens == {4: m[1] - m[0], 7: N - m[1]}
    assert [c[2] for c in rec.calls] == pytest.approx(beta_sigmas(11)[:-1])
    assert torch.isfinite(y).all() and y.shape == (1, N, C)


def test_plan_at_64x64():
    plan = make_plan(JiTConfig.preset("7x"), 64, 64, beta_sigmas(11))
    assert plan.active_tokens == [1310] * 4 + [2457] * 3 + [4096] * 4
    assert [i for i in range(11) if plan.is_transition(i)] == [4, 7]
    plan4 = make_plan(JiTConfig.preset("4x"), 64, 64, beta_sigmas(18))
    assert sorted(set(plan4.active_tokens)) == [1433, 2539, 4096]
    with pytest.raises(ValueError, match="sigmas"):
        make_plan(JiTConfig.preset("7x"), 64, 64, beta_sigmas(10))


@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_nested_active_sets_and_model_inputs(policy):
    cfg = JiTConfig.preset("4x", anchor_policy=policy)
    y, rep, rec = _run(cfg, b=2)
    prev = None
    for x, idx, _, _ in rec.calls:
        rows = idx if idx.dim() == 2 else idx.expand(2, -1)
        assert rows.shape[0] == 2 if policy == "per_sample" else idx.dim() == 1
        assert torch.equal(rows, rows.sort(-1).values)  # kept sorted
        if prev is not None:
            for r in range(2):
                assert set(prev[r].tolist()) <= set(rows[r].tolist())
        prev = rows
    if policy == "per_sample":
        assert not torch.equal(rec.calls[0][1][0], rec.calls[0][1][1])
    assert rec.calls[-1][1].shape[-1] == N


@pytest.mark.parametrize("mode", ["assign", "blend", "substeps"])
def test_dmf_arithmetic(mode):
    """Rebuild the transition by hand from the recorded steps and compare the new tokens."""
    eps = torch.randn(1, N, C, generator=torch.Generator().manual_seed(9))
    cfg = JiTConfig.preset("7x", dmf_mode=mode, relax_steps=4, dmf_noise=eps, backend="reference")
    states = []
    y, rep, rec = _run(cfg, step_callback=lambda i, s, y: states.append(y.clone()))
    sig = beta_sigmas(11)
    i = 4  # first transition
    x_prev, old, _, _ = rec.calls[i - 1]
    v_prev = jk.lift_field(Recorder()(x_prev, old, sig[i - 1], i - 1), old, H, W, backend="reference")
    y_prev = states[i - 2]  # latent before step i-1 (= after step i-2)
    y_pre = states[i - 1]  # latent at sigma_i before the micro-flow
    x_new, idx, _, _ = rec.calls[i]
    new = torch.tensor(sorted(set(idx.tolist()) - set(old.tolist())))
    target = jk.microflow_target(y_prev, v_prev, old, new, eps[:, new], sig[i - 1], sig[i], H, W, backend="reference")
    got = x_new[:, torch.searchsorted(idx, new)]
    before = y_pre[:, new]
    if mode in ("assign", "substeps"):
        torch.testing.assert_close(got, target, rtol=0, atol=1e-6)  # lands on the target
    else:
        torch.testing.assert_close(got, 0.75 * before + 0.25 * target, rtol=0, atol=1e-6)
    # Old anchors are untouched by the micro-flow.
    kept = torch.searchsorted(idx, old)
    torch.testing.assert_close(x_new[:, kept], y_pre[:, old], rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["shared", "per_sample"])
@pytest.mark.parametrize("noise", ["independent", "initial"])
def test_determinism_from_seed(policy, noise):
    cfg = JiTConfig.preset("7x", anchor_policy=policy, dmf_noise=noise)
    y1, _, r1 = _run(cfg, b=2)
    y2, _, r2 = _run(cfg, b=2)
    assert torch.equal(y1, y2)  # bit-identical on CPU
    assert all(torch.equal(a[1], b[1]) for a, b in zip(r1.calls, r2.calls))
    y3, _, r3 = _run(cfg, b=2, gen_seed=2)
    assert not torch.equal(r1.calls[0][1], r3.calls[0][1])  # anchors come from the generator
    assert not torch.equal(y1, y3)


def test_list_of_generators_per_sample():
    cfg = JiTConfig.preset("7x", anchor_policy="per_sample")
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    y, rep = jit_sample(Recorder(), _latents(2), H, W, beta_sigmas(11), cfg, gens)
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="one per sample"):
        jit_sample(Recorder(), _latents(2), H, W, beta_sigmas(11), cfg, gens[:1])


def test_dense_config_is_plain_euler():
    cfg = JiTConfig.dense(6)
    y, rep, rec = _run(cfg)
    sig = beta_sigmas(6)
    ref = _latents()
    f = Recorder()
    for i in range(6):
        ref = ref + (sig[i + 1] - sig[i]) * f(ref, torch.arange(N), sig[i], i)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert rep.active_tokens == [N] * 6


def test_ita_off_and_stride_grid_and_callback_replace():
    cfg = JiTConfig.preset("7x", ita=False, init_grid="stride")
    seen = []

    def cb(i, s, y):
        seen.append(i)
        return torch.zeros_like(y) if i == 10 else None

    y, rep, _ = _run(cfg, step_callback=cb)
    assert seen == list(range(11)) and torch.count_nonzero(y) == 0


def test_interrupt_and_bad_inputs():
    cfg = JiTConfig.preset("7x")
    rec = Recorder()
    y, rep = jit_sample(rec, _latents(), H, W, beta_sigmas(11), cfg, None, interrupt=lambda: len(rec.calls) >= 3)
    assert rep.steps == 3
    with pytest.raises(ValueError, match="grid"):
        jit_sample(rec, _latents(), H, W + 1, beta_sigmas(11), cfg)
    with pytest.raises(ValueError, match="dmf_noise"):
        jit_sample(rec, _latents(), H, W, beta_sigmas(11), cfg.replace(dmf_noise=torch.zeros(1, 3, C)))


def test_bfloat16_latents_keep_dtype():
    cfg = JiTConfig.preset("7x")
    y, rep = jit_sample(lambda x, i, s, k: x * 0.5, _latents().bfloat16(), H, W, beta_sigmas(11), cfg,
                        torch.Generator().manual_seed(0))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_report_times_and_dict():
    y, rep, _ = _run(JiTConfig.preset("4x"))
    assert rep.time_total_s >= rep.time_model_s > 0 and rep.time_sampler_s >= 0
    d = rep.as_dict()
    assert d["steps"] == 18 and d["config"]["name"] == "4x" and "JiT[4x]" in rep.summary()


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("preset, ratio", [("4x", 4.19), ("7x", 7.06)])
def test_flux1_dev_image_linear_flops_match_method_md(preset, ratio):
    plan = make_plan(JiTConfig.preset(preset), 64, 64, beta_sigmas(JiTConfig.preset(preset).total_steps))
    s = flop_summary(FLUX1_DEV_CONFIG, plan.active_tokens, 4096, text_tokens=512)
    assert round(s["speedup_vs_baseline"]["image_linear"], 2) == ratio
    same = {"4x": 18 / 11.93, "7x": 11 / 7.08}[preset]
    assert s["speedup_vs_same_steps"]["image_linear"] == pytest.approx(same, rel=2e-3)
    # Honest totals: text tokens are never sparsified, so the ratios are lower.
    assert s["speedup_vs_baseline"]["linear"] < s["speedup_vs_baseline"]["image_linear"]
    assert s["speedup_vs_baseline"]["total"] < s["speedup_vs_baseline"]["image_linear"]
    s0 = flop_summary(FLUX1_DEV_CONFIG, plan.active_tokens, 4096, text_tokens=0)
    assert s0["speedup_vs_baseline"]["linear"] > s["speedup_vs_baseline"]["linear"]


def test_flux1_dev_dense_flops_scale():
    f = flux_transformer_flops(FLUX1_DEV_CONFIG, 4096, 512)
    # ~59.5 TFLOPs of linear work per step (paper: 2990.96 TFLOPs for 50 steps, profiler linear layers).
    assert 50 * f.linear / 1e12 == pytest.approx(2990.96, rel=0.02)
    assert f.attention == pytest.approx(57 * 4 * (4096 + 512) ** 2 * 3072)
    assert f.attention_image_only == pytest.approx(57 * 4 * 4096 ** 2 * 3072)
    assert f.image_linear == pytest.approx(2 * 4096 * (64 * 3072 + 57 * 12 * 3072 ** 2 + 3072 * 64))
    two = flux_transformer_flops(FLUX1_DEV_CONFIG, 4096, 512, batch=2)
    assert two.total == pytest.approx(2 * f.total)


@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_backends_agree_end_to_end(policy):
    backends = [b for b in ("cpp", "reference") if b in jk.available_backends("cpu")]
    if len(backends) < 2:
        pytest.skip("needs the compiled CPU extension")
    ys = [_run(JiTConfig.preset("7x", backend=be, anchor_policy=policy), b=2)[0] for be in backends]
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=1e-5)


def test_dmf_gives_new_tokens_the_flow_marginal():
    """Pure-noise flow (x0 = 0, v = y / sigma): the exact marginal at sigma is N(0, sigma^2).

    The interpolated velocity leaves inactive tokens over-noised; the DMF target
    (1 - s) Phi + s eps with Phi = Lift(x0_hat) = 0 restores std sigma exactly.
    """
    h = w = 32
    x = torch.randn(4, h * w, 16, generator=torch.Generator().manual_seed(0))
    sig = beta_sigmas(11)
    seen = {}

    def vf(xa, idx, s, i):
        seen[i] = (xa.clone(), idx.clone())
        return xa / s

    states = []
    jit_sample(vf, x, h, w, sig, JiTConfig.preset("7x"), torch.Generator().manual_seed(1),
               step_callback=lambda i, s, y: states.append(y.clone()))
    old, idx = seen[3][1], seen[4][1]
    new = torch.tensor(sorted(set(idx.tolist()) - set(old.tolist())))
    after = seen[4][0][:, torch.searchsorted(idx, new)]
    before = states[3][:, new]
    assert after.std().item() == pytest.approx(sig[4], abs=0.02)
    assert before.std().item() > sig[4] + 0.04


def test_strided_latents_accepted_and_untouched():
    """FLUX.2 packs latents with a permute: the loop must take a non-contiguous view as is."""
    lat = _latents(2)
    strided = lat.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, N, C] with C-major strides
    assert not strided.is_contiguous()
    cfg = JiTConfig.preset("7x")
    y1, _ = jit_sample(Recorder(), lat, H, W, beta_sigmas(11), cfg, torch.Generator().manual_seed(1))
    y2, _ = jit_sample(Recorder(), strided, H, W, beta_sigmas(11), cfg, torch.Generator().manual_seed(1))
    assert torch.equal(y1, y2) and torch.equal(strided, lat)


def test_token_multiple_run():
    y, rep, rec = _run(JiTConfig.preset("7x", token_multiple=8), b=2)
    assert sorted(set(rep.active_tokens)) == [40, 72, N] and torch.isfinite(y).all()
    assert all(c[0].shape[1] % 8 == 0 for c in rec.calls)
