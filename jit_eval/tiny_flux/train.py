"""Deterministic rectified-flow training of the tiny FLUX on MNIST digits.

    python -m jit_eval.tiny_flux.train --out jit_eval/tiny_flux/weights --steps 650 --seed 0

x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, sigma ~ logit-normal,
MSE, AdamW with warm-up and cosine decay, batch 32, labels dropped to the null
label with probability 0.1 (for CFG), +-2 px random shifts. Every draw comes
from one torch.Generator seeded by --seed; the EMA weights are saved.

``--subset-share p`` (default 0: the first checkpoint's recipe, unchanged) shows the
model partial grids, the way large DiTs see many resolutions and aspect ratios: with
probability p a batch keeps only a random share ``U(--subset-min, 1)`` of the 256 image
tokens, with their own position ids, and the loss is taken on the kept tokens. Half of
those subsets are uniform draws, half a strided lattice (stride 2 or 3, random offset)
filled up with uniform draws, the shape of JiT's anchor sets.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import math
import os
import time

import torch
import torch.nn.functional as F

from .data import draw_scenes, load_mnist, random_shift
from .model import (DEFAULT_CONFIG, SCENES_CONFIG, build_tiny_flux, image_ids, load_tiny_flux, pack_images,
                    save_tiny_flux)


DATASETS = ("digits", "scenes")
STATE_FILE = "train_state.pt"


def train(out: str, steps: int, seed: int = 0, batch: int = 32, lr: float = 1e-3, warmup: int = 50,
          ema_decay: float = 0.995, save_every: int = 100, threads: int = 1, config: dict | None = None,
          log=print, subset_share: float = 0.0, subset_min: float = 0.25, dataset: str = "digits",
          resume: bool = False, stop_after: int | None = None, init_from: str | None = None) -> dict:
    """Train and save the EMA weights to ``out``; every ``save_every`` steps also the full training
    state (``out/train_state.pt``: weights, EMA, optimiser, scheduler, generator, step, log).

    ``resume=True`` continues from that state when it exists (the recipe must match; the result is
    the same as an uninterrupted run). ``stop_after=k`` returns after step ``k`` (state saved), for
    runs split over several sessions. ``dataset="scenes"`` trains the 64 x 64 multi-digit testbed
    (:data:`~jit_eval.tiny_flux.model.SCENES_CONFIG` unless ``config`` is given).

    ``init_from`` (a checkpoint name or folder) starts the weights and their EMA from a saved
    checkpoint instead of a random draw, with a fresh optimiser and schedule: a continuation
    run, e.g. one session's worth of steps on top of a committed checkpoint. Its config is the
    checkpoint's; the recipe records the checkpoint's SHA-256, so ``resume`` refuses another one.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if not 0.0 <= subset_share <= 1.0:
        raise ValueError(f"subset_share must be in [0, 1], got {subset_share}")
    if not 0.0 < subset_min <= 1.0:
        raise ValueError(f"subset_min must be in (0, 1], got {subset_min}")
    if steps < 1 or save_every < 1 or batch < 1:
        raise ValueError(f"steps, save_every and batch must be >= 1, got {steps}, {save_every}, {batch}")
    if stop_after is not None and not 1 <= stop_after <= steps:
        raise ValueError(f"stop_after must be in [1, steps={steps}], got {stop_after}")
    init = None
    if init_from is not None:
        init = load_tiny_flux(init_from)
        if config is not None and config != init.config:
            raise ValueError(f"config differs from the config of init_from={init_from!r}; leave config out")
        config = init.config
    config = config or (SCENES_CONFIG if dataset == "scenes" else DEFAULT_CONFIG)
    if bool(config.get("slots")) != (dataset == "scenes"):
        raise ValueError(f"dataset {dataset!r} needs a config {'with' if dataset == 'scenes' else 'without'} 'slots'")
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    recipe = {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "warmup": warmup, "ema_decay": ema_decay,
              "subset_share": subset_share, "subset_min": subset_min, "dataset": dataset, "config": config}
    if init is not None:
        recipe["init_sha256"] = weights_sha256(init)
    try:
        return _train(out, recipe, save_every, log, resume, stop_after, init)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def draw_token_subset(height: int, width: int, share: float, g: torch.Generator) -> torch.Tensor:
    """Sorted int64 token indices: ``round(share * H * W)`` of them (at least 1), drawn from ``g``.

    A coin picks a uniform draw or a strided lattice (stride 2 or 3, random offset,
    thinned at random when it exceeds the count) filled up with uniform draws.
    """
    n = height * width
    m = max(1, min(n, round(share * n)))
    if torch.rand((), generator=g) < 0.5:
        return torch.randperm(n, generator=g)[:m].sort().values
    s = int(torch.randint(2, 4, (), generator=g))
    r0, c0 = (int(v) for v in torch.randint(0, s, (2,), generator=g))
    rr = torch.arange(r0, height, s)[:, None]
    cc = torch.arange(c0, width, s)[None, :]
    lattice = (rr * width + cc).flatten()
    if lattice.numel() >= m:
        return lattice[torch.randperm(lattice.numel(), generator=g)[:m]].sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[lattice] = False
    rest = mask.nonzero().flatten()
    fill = rest[torch.randperm(rest.numel(), generator=g)[: m - lattice.numel()]]
    return torch.cat([lattice, fill]).sort().values


def _save_state(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the save leaves the previous state intact


def weights_sha256(model) -> str:
    """SHA-256 over a model's state dict (names, shapes and float32 bytes, in order)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _train(out, recipe, save_every, log, resume=False, stop_after=None, init=None) -> dict:
    steps, seed, batch, lr, warmup = (recipe[k] for k in ("steps", "seed", "batch", "lr", "warmup"))
    ema_decay, subset_share, subset_min = recipe["ema_decay"], recipe["subset_share"], recipe["subset_min"]
    config, scenes = recipe["config"], recipe["dataset"] == "scenes"
    g = torch.Generator().manual_seed(seed)
    images, labels = load_mnist("train")
    model = build_tiny_flux(config, seed=seed).train()
    if init is not None:
        model.load_state_dict(init.state_dict())
    full_ids = image_ids(model.height, model.width)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, STATE_FILE)
    start, run, rows, elapsed0 = 0, 0.0, [], 0.0
    if resume and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=True)
        if st["recipe"] != recipe:
            diff = sorted(k for k in recipe if st["recipe"].get(k) != recipe[k])
            raise ValueError(f"{state_path} was saved by another recipe (differs in {diff}); resume with the same arguments")
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["generator"])
        start, run, rows, elapsed0 = st["step"], st["run"], st["rows"], st["elapsed_s"]
        log(f"resumed {out} at step {start}/{steps}")
    elif resume:
        log(f"no {state_path}: starting from step 0")
    layout, jitter = tuple(config.get("layout", (2, 2))), config.get("jitter", 0)
    log_path = os.path.join(out, "train_log.csv")
    t0 = time.time()
    last = stop_after or steps
    with open(log_path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["step", "loss", "lr", "elapsed_s"])
        wr.writerows(rows)
        f.flush()
        for step in range(start + 1, last + 1):
            if scenes:
                scene, lab = draw_scenes(images, labels, batch, g, layout, jitter, config["empty_prob"],
                                         model.empty_label)
                x0 = pack_images(scene)
            else:
                idx = torch.randint(0, images.shape[0], (batch,), generator=g)
                x0 = pack_images(random_shift(images[idx], g))
                lab = labels[idx].clone()
            lab[torch.rand(batch, generator=g) < 0.1] = model.null_label
            sigma = torch.sigmoid(torch.randn(batch, generator=g))
            eps = torch.randn(x0.shape, generator=g)
            xs = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
            target = eps - x0
            if subset_share > 0 and torch.rand((), generator=g) < subset_share:
                share = subset_min + (1.0 - subset_min) * float(torch.rand((), generator=g))
                keep = draw_token_subset(model.height, model.width, share, g)
                loss = F.mse_loss(model.velocity(xs[:, keep], sigma, lab, full_ids[keep]), target[:, keep])
            else:
                loss = F.mse_loss(model.velocity(xs, sigma, lab), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            d = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
            run = 0.98 * run + 0.02 * loss.item() if step > 1 else loss.item()
            if step % 10 == 0 or step == steps:
                rows.append([step, f"{run:.5f}", f"{sched.get_last_lr()[0]:.6f}", f"{elapsed0 + time.time() - t0:.1f}"])
                wr.writerow(rows[-1])
                f.flush()
            if step % 100 == 0:
                log(f"step {step}/{steps} loss {run:.4f} {elapsed0 + time.time() - t0:.0f}s")
            if step % save_every == 0 or step == last:
                save_tiny_flux(ema, out)
                _save_state(state_path, {
                    "recipe": recipe, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "generator": g.get_state(), "run": run,
                    "rows": rows, "elapsed_s": elapsed0 + time.time() - t0})
    return {"steps": last, "final_loss": run, "seconds": elapsed0 + time.time() - t0,
            "params": sum(p.numel() for p in model.parameters())}


def save_sample_grid(model, path: str, seeds: int = 4, steps: int = 50, cfg_scale: float = 1.0) -> torch.Tensor:
    """Rows = classes 0-9, columns = seeds 0..seeds-1 (one generator per seed), dense Euler; saves a PNG."""
    from PIL import Image

    from .model import sample_dense

    cols = []
    for s in range(seeds):
        g = torch.Generator().manual_seed(s)
        cols.append(sample_dense(model, torch.arange(10), steps=steps, generator=g, cfg_scale=cfg_scale))
    imgs = torch.stack(cols, 1)  # [10, seeds, 1, 32, 32]
    grid = imgs.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)[:, :, 0]
    grid = grid.permute(0, 2, 1, 3).reshape(10 * 32, seeds * 32)
    Image.fromarray(grid.numpy()).resize((seeds * 64, 10 * 64), Image.NEAREST).save(path)
    return imgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=650)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--subset-share", type=float, default=0.0,
                   help="probability that a batch keeps only a random subset of the image tokens (0: dense only)")
    p.add_argument("--subset-min", type=float, default=0.25, help="smallest kept share of the tokens in a subset batch")
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: one 32 x 32 digit (the first two checkpoints); scenes: 64 x 64 scenes of four slots")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt when it exists")
    p.add_argument("--stop-after", type=int, default=None, help="return after this step (continue later with --resume)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start weights and EMA from this checkpoint (name or folder): a continuation run")
    args = p.parse_args(argv)
    res = train(args.out, args.steps, args.seed, args.batch, args.lr, args.warmup, args.ema, args.save_every,
                threads=args.threads, subset_share=args.subset_share, subset_min=args.subset_min,
                dataset=args.dataset, resume=args.resume, stop_after=args.stop_after, init_from=args.init_from)
    print(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
