"""How far one seed moves between fp32 and bf16 weights: dense sampling vs JiT, on the embedded tiny FLUX.

    python -m benchmarks.repro_precision                       # -> results/repro_precision.{json,md}
    python -m benchmarks.repro_precision --seeds 2 --name x    # a smoke run

For each committed checkpoint (``tiny``, ``tiny-subsets``), method (``dense-50``: Euler on all
tokens, 50 linear steps, the quality bench's reference; JiT ``7x`` and ``4x``), digit 0-9 and
seed, the same noise is sampled twice, with the model's weights in float32 and in bfloat16
(CFG 3; the sampler's working latent is float32 in both; every JiT draw from the same seed).
Per row:

- ``rel L2``: ``||x_bf16 - x_fp32|| / ||x_fp32||`` of the final latent (median, 90th percentile,
  max over the images). Dense sampling is a continuous function of the model, so this is the
  size of bf16's rounding carried through the ODE; JiT adds a discrete choice (which tokens
  importance-guided activation picks), which can make it jump.
- ``set differs``: share of JiT runs whose token set after the first transition differs
  between the two precisions (a near-tie at the top-k boundary decided by rounding).
- ``rel L2 if same set``: the median over the runs whose sets agree.
- ``same digit``: share of images the digit classifier reads as the same digit in both.
- ``digit ok (fp32)``: share of fp32 images read as the requested digit (a quality sanity
  check, not the quality suite: ``benchmarks.quality`` measures fidelity).

Each image is a batch of one (a user's single image: no batch-mean importance). The table
records the command, versions and git sha of the code it measured.

``--quality-seeds N`` also runs the quality suite's own measurement (:func:`benchmarks.quality.run_quality`:
KID, FD, digit accuracy and ink bias against the held-out real digits, fp32, batches of the
ten digits) for dense-50 and JiT 4x / 7x on ``N`` seeds per checkpoint, written to
``results/<name>_quality.{json,md}``: a change made for reproducibility must not cost fidelity.
``--seeds 0`` skips the precision table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jit_sampler import JiTConfig, jit_sample
from jit_sampler.schedule import beta_sigmas, linear_sigmas

from .env import command_line, environment, write_results

CHECKPOINTS = ("tiny", "tiny-subsets")
CFG_SCALE = 3.0


class Recorder:
    """Wraps a ``velocity_fn`` and keeps the active token set of every call."""

    def __init__(self, fn):
        self.fn, self.sets = fn, []

    def __call__(self, x, active_idx, sigma, step):
        self.sets.append(active_idx)
        return self.fn(x, active_idx, sigma, step)


def _methods():
    return [("dense-50", JiTConfig.dense(50), linear_sigmas(50)),
            ("JiT 7x", JiTConfig.preset("7x"), beta_sigmas(11, 1.4, 0.425)),
            ("JiT 4x", JiTConfig.preset("4x"), beta_sigmas(18, 1.4, 0.425))]


def _sample(model, label: int, noise, cfg: JiTConfig, sigmas, seed: int):
    from jit_eval.tiny_flux import TinyVelocity

    fn = Recorder(TinyVelocity(model, torch.tensor([label]), CFG_SCALE, backend=cfg.backend))
    y, _ = jit_sample(fn, noise, model.height, model.width, sigmas, cfg, torch.Generator().manual_seed(seed))
    first_transition = cfg.layout().ends[0] if cfg.num_stages > 1 else None
    chosen = None if first_transition is None else frozenset(fn.sets[first_transition].tolist())
    return y.float(), chosen


def _pct(values, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run(seeds: int, checkpoints=CHECKPOINTS, log=print) -> list[dict]:
    from jit_eval.tiny_flux import load_tiny_flux, unpack_tokens
    from jit_eval.tiny_flux.classifier import load_classifier

    classifier = load_classifier()
    rows = []
    for ck in checkpoints:
        models = {dt: load_tiny_flux(ck, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
        for name, cfg, sigmas in _methods():
            rel, rel_same, flips, same_digit, ok = [], [], 0, 0, 0
            t = time.perf_counter()
            for seed in range(seeds):
                for label in range(10):
                    noise = torch.randn(1, 256, 4, generator=torch.Generator().manual_seed(10_000 * seed + label))
                    a, set_a = _sample(models[torch.float32], label, noise, cfg, sigmas, seed)
                    b, set_b = _sample(models[torch.bfloat16], label, noise, cfg, sigmas, seed)
                    r = float((b - a).norm() / a.norm())
                    rel.append(r)
                    if set_a == set_b:
                        rel_same.append(r)
                    else:
                        flips += 1
                    pa, pb = (classifier.predict(unpack_tokens(x).clamp(-1, 1)).item() for x in (a, b))
                    same_digit += pa == pb
                    ok += pa == label
            n = len(rel)
            row = {"checkpoint": ck, "method": name, "images": n,
                   "rel L2 median": f"{statistics.median(rel):.4f}", "rel L2 p90": f"{_pct(rel, 0.9):.4f}",
                   "rel L2 max": f"{max(rel):.4f}",
                   "set differs": "-" if cfg.num_stages == 1 else f"{flips / n:.0%}",
                   "rel L2 if same set": f"{statistics.median(rel_same):.4f}" if rel_same else "-",
                   "same digit": f"{same_digit / n:.0%}", "digit ok (fp32)": f"{ok / n:.0%}"}
            rows.append(row)
            log(f"{ck:13s} {name:9s} median {row['rel L2 median']} p90 {row['rel L2 p90']} max {row['rel L2 max']} "
                f"set differs {row['set differs']} ({time.perf_counter() - t:.0f}s)")
    return rows


QUALITY_ROWS = ("dense-50", "JiT 4x assign/independent", "JiT 7x assign/independent")


def run_fidelity(seeds: int, checkpoints=CHECKPOINTS, log=print) -> list[dict]:
    """The quality suite's rows :data:`QUALITY_ROWS` on ``seeds`` seeds x 10 digits per checkpoint."""
    from jit_eval.tiny_flux import load_tiny_flux

    from .quality import build_methods, run_quality

    methods = [m for m in build_methods() if m.name in QUALITY_ROWS]
    rows = []
    for ck in checkpoints:
        out = run_quality(seeds=seeds, headline_seeds=seeds, repeats=1, model=load_tiny_flux(ck), methods=methods,
                          log=lambda *a: None)
        for r in out["rows"]:
            if r["method"] not in QUALITY_ROWS:  # the suite's real-digits floor row
                continue
            rows.append({"checkpoint": ck, "method": r["method"], "images": r["images"],
                         "KID": f"{r['kid']:.0f} +- {r['kid_std']:.0f}", "FD": r["fd"],
                         "accuracy %": r["accuracy"], "ink vs dense-50 %": r["ink_bias_pct"]})
            log(f"{ck:13s} {r['method']:28s} KID {r['kid']:.0f} +- {r['kid_std']:.0f} accuracy {r['accuracy']}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds x 10 digits per row (default 3: 30 images)")
    p.add_argument("--name", default="repro_precision", help="results/<name>.{json,md}")
    p.add_argument("--checkpoints", nargs="+", default=list(CHECKPOINTS))
    p.add_argument("--quality-seeds", type=int, default=0,
                   help="also the quality suite's KID / accuracy / ink on this many seeds x 10 digits (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    env["command"] = command_line("benchmarks.repro_precision", sys.argv[1:] if argv is None else argv)
    from pathlib import Path

    results = Path(__file__).parent / "results"
    if args.seeds > 0:
        rows = run(args.seeds, args.checkpoints)
        cols = ["checkpoint", "method", "images", "rel L2 median", "rel L2 p90", "rel L2 max", "set differs",
                "rel L2 if same set", "same digit", "digit ok (fp32)"]
        caption = ("Same noise and seed, model weights fp32 vs bf16 (CFG 3, batch 1, working latent fp32): relative "
                   "L2 difference of the final latent. 'set differs': JiT runs whose token set after the first "
                   "transition differs between the two precisions. See the module docstring.")
        write_results(results / args.name, "Reproducibility across precision (fp32 vs bf16)", env, rows, cols,
                      caption)
    if args.quality_seeds > 0:
        rows = run_fidelity(args.quality_seeds, args.checkpoints)
        cols = ["checkpoint", "method", "images", "KID", "FD", "accuracy %", "ink vs dense-50 %"]
        caption = ("benchmarks.quality's measurement (fp32, CFG 3, batches of the ten digits) on the rows above: "
                   "KID / FD in the digit classifier's feature space against held-out real digits (lower is "
                   "closer), accuracy = images read as the requested digit, ink relative to dense-50.")
        write_results(results / f"{args.name}_quality", "Fidelity of the same code (tiny checkpoints)", env, rows,
                      cols, caption)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
