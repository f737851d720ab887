"""Bit-exactness snapshot: every op (valid inputs, each CPU backend) and jit_sample end to end.

    TRITON_INTERPRET=1 python -m benchmarks.bits_snapshot before.pt     # at one revision
    TRITON_INTERPRET=1 python -m benchmarks.bits_snapshot after.pt      # at another
    python -m benchmarks.bits_snapshot --compare before.pt after.pt     # bit for bit

A change that must not alter valid-input results (issue 22) is checked this way: the
snapshot of the revision before it and after it must be equal byte for byte.
"""

import sys

import torch
import jit_kernels as jk
from jit_sampler import JiTConfig, beta_sigmas, jit_sample
if len(sys.argv) == 4 and sys.argv[1] == "--compare":
    a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])

    def raw(t):
        return t.contiguous().view(-1).view(torch.uint8) if t.is_floating_point() else t

    differ = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not (
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(raw(a[k]), raw(b[k])))]
    print(f"{len(a)} outputs, {len(differ)} differ: {differ}")
    sys.exit(1 if differ else 0)

out = {}
g = torch.Generator().manual_seed(0)
H, W, C, B = 12, 10, 6, 2
N = H * W
for be in ["reference", "cpp", "triton"]:
    for dt in (torch.float32, torch.bfloat16):
        for ps in (False, True):
            a = torch.randperm(N, generator=g)[:23].sort().values
            a = torch.stack([a, torch.randperm(N, generator=g)[:23]]) if ps else a
            x = torch.randn(B, N, C, generator=g).to(dt)
            k = f"{be}/{dt}/{ps}"
            near = jk.nearest_anchor_map(a, H, W, backend=be)
            out[k + "/near"] = near
            v = jk.gather_tokens(x, a, backend=be); out[k + "/gather"] = v
            out[k + "/scatter"] = jk.scatter_tokens(x, a, v * 2, backend=be)
            y = x.clone(); jk.scatter_tokens_(y, a, v * 3, backend=be); out[k + "/scatter_"] = y
            out[k + "/lift"] = jk.lift_field(v, a, H, W, nearest=near, backend=be)
            y = x.clone(); jk.lift_euler_(y, v, a, H, W, -0.07, nearest=near, backend=be); out[k + "/euler"] = y
            imp = jk.token_importance(x, H, W, backend=be); out[k + "/imp"] = imp
            new = jk.select_new_tokens(imp if ps else imp.mean(0, keepdim=True), a, 7, backend=be)
            new = new if ps else new[0]
            out[k + "/select"] = new
            y = x.clone(); jk.microflow_update_(y, new, torch.randn(B, 7, C, generator=g), "blend", 0.3, backend=be)
            out[k + "/update"] = y
            out[k + "/target"] = jk.microflow_target(x, x * 0.5, a, new, torch.randn(B, 7, C, generator=g), 0.8, 0.5,
                                                     H, W, nearest=near, backend=be)
        q, kk, vv = (torch.randn(2, 20, 2, 8, generator=g).to(dt) for _ in range(3))
        cs, sn = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
        out[f"{be}/{dt}/attn"] = jk.anchor_attention(q, kk, vv, cs, sn, key_lengths=torch.tensor([20, 11]), backend=be)
def vel(x, idx, s, i):
    return 0.6 * x + torch.tanh(x.roll(1, dims=-1)) * s
for be in ["reference", "cpp", "triton"]:
    for preset in ("4x", "7x"):
        for pol in ("shared", "per_sample"):
            cfg = JiTConfig.preset(preset, anchor_policy=pol, backend=be)
            lat = torch.randn(2, 16 * 16, 8, generator=torch.Generator().manual_seed(3))
            out[f"sample/{be}/{preset}/{pol}"] = jit_sample(vel, lat, 16, 16, beta_sigmas(cfg.total_steps), cfg,
                                                           torch.Generator().manual_seed(4))[0]
torch.save(out, sys.argv[1])
print(len(out), "outputs")
