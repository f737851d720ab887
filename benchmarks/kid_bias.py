"""KID between two disjoint digit-balanced sets of one generator: the i != j estimator vs the stratified one.

    python -m benchmarks.kid_bias --seeds 40 --splits 200    # writes results/kid_bias_cpu.json

One dense sampler (``--steps`` Euler steps, CFG 3, the quality suite's settings) draws
``--seeds`` seed batches of the ten digits from one checkpoint. The pooled batches are split
``--splits`` times at random into two halves (two independent balanced sets of one
distribution) and each split is scored with :func:`jit_eval.metrics.mmd2` twice: without
labels (the i != j estimator the suite's ``kid()`` used, biased for balanced sets) and with the
digit as the stratum. An unbiased estimator centres on 0; the predicted bias of the other is
``-9 / (10 (n - 1))`` times the sum over both sets of the same-digit kernel excess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from jit_eval.metrics import mmd2, poly_kernel

from .env import command_line, environment


def run(model_name: str = "tiny", seeds: int = 40, splits: int = 200, steps: int = 12, cfg_scale: float = 3.0,
        seed: int = 0, log=print) -> dict:
    from jit_eval.tiny_flux import load_tiny_flux, sample_dense
    from jit_eval.tiny_flux.classifier import load_classifier
    from jit_eval.tiny_flux.scenes import Scorer

    if seeds < 4 or seeds % 2 or splits < 2:
        raise ValueError(f"need an even seeds >= 4 and splits >= 2, got {seeds}, {splits}")
    model, clf = load_tiny_flux(model_name), load_classifier()
    if getattr(model, "slots", None):
        raise ValueError("kid_bias runs on a single-digit checkpoint (tiny, tiny-subsets)")
    scorer = Scorer(clf)
    feats = []
    for s in range(seeds):
        img = sample_dense(model, torch.arange(10), steps=steps, generator=torch.Generator().manual_seed(s),
                           cfg_scale=cfg_scale).clamp(-1, 1)
        feats.append(scorer.features(img).double())
        if (s + 1) % 10 == 0:
            log(f"{s + 1}/{seeds} seed batches")
    f = torch.stack(feats)  # [seeds, 10, D]
    lab = torch.arange(10).repeat(seeds // 2)
    n = lab.numel()
    g = torch.Generator().manual_seed(seed)
    old, new, predicted = [], [], []
    for _ in range(splits):
        perm = torch.randperm(seeds, generator=g)
        a, b = f[perm[: seeds // 2]].flatten(0, 1), f[perm[seeds // 2:]].flatten(0, 1)
        old.append(mmd2(a, b))
        new.append(mmd2(a, b, lab, lab))
        excess = 0.0
        for x in (a, b):  # same-digit minus other-digit kernel mean, off the diagonal
            k = poly_kernel(x, x)
            same = (lab[:, None] == lab[None, :]) & ~torch.eye(n, dtype=torch.bool)
            excess += float(k[same].mean() - k[lab[:, None] != lab[None, :]].mean())
        predicted.append(-9 * excess / (10 * (n - 1)))
    old_t, new_t = torch.tensor(old, dtype=torch.float64), torch.tensor(new, dtype=torch.float64)

    def summary(t):
        return dict(mean=round(float(t.mean()), 2), std=round(float(t.std()), 2),
                    q05=round(float(t.quantile(0.05)), 2), q95=round(float(t.quantile(0.95)), 2))

    return dict(model=model_name, steps=steps, cfg_scale=cfg_scale, seed_batches=seeds, images_per_set=n,
                splits=splits, old_i_ne_j=summary(old_t), stratified=summary(new_t),
                predicted_bias=round(sum(predicted) / len(predicted), 2),
                measured_bias=round(float((old_t - new_t).mean()), 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--seeds", type=int, default=40, help="seed batches of ten digits (even; half per set)")
    p.add_argument("--splits", type=int, default=200)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.model, args.seeds, args.splits, args.steps, args.cfg_scale)
    res["env"] = environment()
    res["env"]["command"] = command_line("benchmarks.kid_bias", sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kid_bias_cpu.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
