"""Scoring of the scenes testbed (``tiny-scenes``): per-slot crops read by the digit classifier.

A scene is a 64 x 64 canvas with one digit per slot of a 2 x 2 layout, each jittered by a few
pixels (:func:`jit_eval.tiny_flux.data.draw_scenes`). The bench prompts it with
:func:`scene_prompts` (every slot filled, each slot's column a permutation of the ten digits)
and reads it slot by slot: :func:`slot_crops` cuts each slot's 32 x 32 cell re-centred on its
ink (real MNIST digits are centred by their centre of mass, which is what the classifier saw),
and :class:`Scorer` turns images into classifier features (the slots' 128-d features side by
side, so the layout's joint statistics count) and the share of slots read as their label.
"""

from __future__ import annotations

import torch

from .data import compose_scenes, load_mnist, slot_origins

__all__ = ["scene_prompts", "prompts_for", "slot_crops", "real_scenes", "Scorer"]

#: Where a padded MNIST digit's ink centre of mass sits in its 32 x 32 image (row and column;
#: the held-out digits' mean is (15.99, 16.00), spread 0.3 px): the crops put it there.
INK_CENTRE = 16.0


def scene_prompts(n: int = 10, slots: int = 4) -> torch.Tensor:
    """``[n, slots]`` int64 prompts: slot ``k`` of prompt ``j`` asks for digit ``(j + 3 k) % 10``
    (distinct digits in a scene; over ten prompts every slot sees each digit once)."""
    if not 1 <= n <= 10 or slots < 1:
        raise ValueError(f"need 1 <= n <= 10 prompts and slots >= 1, got {n}, {slots}")
    return (torch.arange(n)[:, None] + 3 * torch.arange(slots)[None, :]) % 10


def prompts_for(model, n: int = 10) -> torch.Tensor:
    """One batch of ``n`` prompts for a tiny FLUX: digits ``0 .. n-1``, or for a scenes model
    :func:`scene_prompts` (``[n, slots]``); prompt ``j`` is stratum ``j`` of a balanced set."""
    if getattr(model, "slots", None):
        return scene_prompts(n, model.slots)
    if not 1 <= n <= 10:
        raise ValueError(f"need 1 <= n <= 10 prompts, got {n}")
    return torch.arange(n)


def slot_crops(images: torch.Tensor, layout=(2, 2), max_shift: int = 6) -> torch.Tensor:
    """``[B, 1, 32 R, 32 C]`` scenes -> ``[B, S, 1, 32, 32]`` crops, one per slot (row-major).

    Each crop starts at the slot's cell, moved (by at most ``max_shift`` px) so that the ink's
    centre of mass inside the cell sits where a real digit's does (:data:`INK_CENTRE`); a blank cell
    is cut as it is.
    """
    b, c, h, w = images.shape
    if c != 1 or (h, w) != (32 * layout[0], 32 * layout[1]):
        raise ValueError(f"expected scenes [B, 1, {32 * layout[0]}, {32 * layout[1]}], got {tuple(images.shape)}")
    m = max_shift
    pad = torch.nn.functional.pad(images.float(), (m,) * 4, value=-1.0)
    grid = torch.arange(32, dtype=torch.float32)
    out = []
    for r0, c0 in slot_origins(layout):
        cell = images[:, 0, r0:r0 + 32, c0:c0 + 32].float()
        ink = ((cell + 1) / 2).clamp(0, 1)
        mass = ink.sum((1, 2))
        centre = torch.full_like(mass, INK_CENTRE)
        cy = torch.where(mass > 0, (ink.sum(2) * grid).sum(1) / mass.clamp_min(1e-9), centre)
        cx = torch.where(mass > 0, (ink.sum(1) * grid).sum(1) / mass.clamp_min(1e-9), centre)
        dy = (cy - INK_CENTRE).round().clamp(-m, m).long()
        dx = (cx - INK_CENTRE).round().clamp(-m, m).long()
        out.append(torch.stack([pad[i, :, m + r0 + dy[i]:m + r0 + dy[i] + 32, m + c0 + dx[i]:m + c0 + dx[i] + 32]
                                for i in range(b)]))
    return torch.stack(out, 1)


def real_scenes(prompts: torch.Tensor, per_prompt: int, split: str = "heldout", seed: int = 0, layout=(2, 2),
                max_jitter: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of real digits for ``prompts [P, S]`` (each slot a random digit of its label from
    ``split``, jittered as in training), ``per_prompt`` of each prompt; returns ``(scenes, prompt index)``."""
    if prompts.dim() != 2 or prompts.shape[1] != layout[0] * layout[1] or per_prompt < 1:
        raise ValueError(f"need prompts [P, {layout[0] * layout[1]}] and per_prompt >= 1, got "
                         f"{tuple(prompts.shape)}, {per_prompt}")
    x, y = load_mnist(split)
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(y == c)[:, 0] for c in range(10)]
    lab = prompts.repeat(per_prompt, 1)
    pick = torch.stack([by_class[int(v)][torch.randint(0, by_class[int(v)].numel(), (), generator=g)]
                        for v in lab.flatten()]).view(lab.shape)
    offsets = torch.randint(-max_jitter, max_jitter + 1, (*lab.shape, 2), generator=g)
    present = torch.ones(lab.shape, dtype=torch.bool)
    scenes = compose_scenes(x[pick], present, offsets, layout, max_jitter)
    return scenes, torch.arange(prompts.shape[0]).repeat(per_prompt)


class Scorer:
    """Classifier readings of generated images: ``features(images) [B, D]`` and ``correct(images,
    labels)`` (per digit, or per filled slot of a scene). ``layout=None``: single 32 x 32 digits."""

    def __init__(self, classifier, layout=None):
        self.classifier, self.layout = classifier, None if layout is None else tuple(layout)

    @torch.no_grad()
    def _read(self, images: torch.Tensor):
        if self.layout is None:
            f = self.classifier.features(images)
            return f, f
        crops = slot_crops(images, self.layout)
        b, s = crops.shape[:2]
        f = self.classifier.features(crops.flatten(0, 1))  # [B * S, 128]
        return f.view(b, -1), f

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._read(images)[0]

    @torch.no_grad()
    def correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Boolean ``[n]``: each digit (each slot whose label is a digit, 0-9) read as its label."""
        per = self.classifier.head(self._read(images)[1]).argmax(-1)
        want = labels.flatten()
        keep = want < 10
        return (per == want)[keep]
