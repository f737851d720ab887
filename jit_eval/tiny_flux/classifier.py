"""The digit classifier of the quality suite (docs/evaluation.md section 2).

Trained once, deterministically, on the *held-out* half of the digits (the half the
generator never saw); its accuracy is measured on the generator's training half.
It plays two roles:

- prompt adherence (GenEval's role): the fraction of generated images whose predicted
  class is the label they were generated for;
- distribution quality (FID's role): its penultimate-layer features (``features``, 128-d)
  feed the Frechet distance between generated and real held-out digits.

    python -m jit_eval.tiny_flux.classifier --out jit_eval/tiny_flux/weights --steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import load_mnist, random_shift
from .model import WEIGHTS_DIR

__all__ = ["DigitClassifier", "load_classifier", "train_classifier", "CLASSIFIER_FILE"]

CLASSIFIER_FILE = "classifier.safetensors"


class DigitClassifier(nn.Module):
    """Three conv blocks (16/32/64 channels, 32 -> 4 px) and a 128-d feature layer; images in ``[-1, 1]``."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1),
                                    nn.Conv2d(32, 64, 3, padding=1)])
        self.fc = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, 128]`` of images ``[B, 1, 32, 32]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 32, 32):
            raise ValueError(f"expected images [B, 1, 32, 32], got {tuple(x.shape)}")
        h = x.float()
        for conv in self.convs:
            h = F.max_pool2d(F.relu(conv(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(-1)


def train_classifier(steps: int = 3000, seed: int = 0, batch: int = 64, lr: float = 2e-3, log=print) -> tuple[DigitClassifier, dict]:
    """Train on the held-out split (deterministic from ``seed``); returns ``(model, info)`` with the
    accuracy on the generator's training split."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)  # parameter init only; every data draw uses g
        model = DigitClassifier()
        g = torch.Generator().manual_seed(seed)
        x, y = load_mnist("heldout")
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        t0 = time.time()
        for step in range(1, steps + 1):
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            xb = random_shift(x[idx], g)
            xb = xb + 0.1 * torch.randn(xb.shape, generator=g)  # robustness to sampler noise
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 500 == 0:
                log(f"classifier step {step}/{steps} loss {loss.item():.4f}")
        model.eval()
        xt, yt = load_mnist("train")
        acc = float((model.predict(xt) == yt).float().mean())
        info = {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "train_split": "heldout",
                "accuracy_on_train_split": round(acc, 4), "seconds": round(time.time() - t0, 1)}
        return model, info
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def save_classifier(model: DigitClassifier, info: dict, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, CLASSIFIER_FILE),
              metadata={k: str(v) for k, v in info.items()})
    with open(os.path.join(path, "classifier.json"), "w") as f:
        json.dump(info, f, indent=1)


def load_classifier(path: str | None = None, device="cpu") -> DigitClassifier:
    """The committed classifier (``path``: a directory holding ``classifier.safetensors``)."""
    from safetensors.torch import load_file

    path = path or WEIGHTS_DIR
    file = os.path.join(path, CLASSIFIER_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no digit classifier at {file}; train one with "
                                f"python -m jit_eval.tiny_flux.classifier --out {path}")
    model = DigitClassifier()
    model.load_state_dict(load_file(file))
    return model.eval().requires_grad_(False).to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="train the quality suite's digit classifier on the held-out digits")
    p.add_argument("--out", default=WEIGHTS_DIR)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, info = train_classifier(args.steps, args.seed)
    save_classifier(model, info, args.out)
    print(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
