"""The embedded default model: diffusers' FluxTransformer2DModel, scaled down, class-conditional.

A 32 x 32 grayscale digit is packed 2 x 2 exactly like FLUX packs its latent,
giving a 16 x 16 grid of 256 tokens of width 4. The class label plays the
prompt: a learned table gives ``encoder_hidden_states`` tokens and the pooled
projection, so the transformer is driven exactly like FLUX. Label 10 is the
null label for classifier-free guidance.
"""

from __future__ import annotations

import json
import os

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "DEFAULT_CONFIG",
    "LabelConditioner",
    "SlotConditioner",
    "SCENES_CONFIG",
    "TinyFlux",
    "build_tiny_flux",
    "load_tiny_flux",
    "save_tiny_flux",
    "pack_images",
    "unpack_tokens",
    "image_ids",
    "text_ids",
    "sample_dense",
    "WEIGHTS_DIR",
    "CHECKPOINTS",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.join(_HERE, "weights")
# The committed checkpoints by name: "tiny" trained on full 16 x 16 grids only; "tiny-subsets"
# also on random token subsets with their own position ids (train.py --subset-share).
# "tiny-scenes": 64 x 64 scenes of up to four digits (32 x 32 = 1,024 tokens), one label per slot.
CHECKPOINTS = {"tiny": WEIGHTS_DIR, "tiny-subsets": os.path.join(_HERE, "weights_subsets"),
               "tiny-scenes": os.path.join(_HERE, "weights_scenes")}

DEFAULT_CONFIG = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 4,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "guidance_embeds": False,
        "axes_dims_rope": [8, 12, 12],
    },
    "cond_tokens": 4,
    "num_labels": 10,
    "image_size": 32,
}

# The scenes testbed (train.py --dataset scenes): a 64 x 64 canvas holding ``slots`` digits on a
# ``layout`` grid of 32 x 32 cells, each jittered by up to ``jitter`` px; the prompt is one label
# per slot (0-9, 10 = empty slot, 11 = null for CFG), ``cond_tokens`` tokens per slot.
SCENES_CONFIG = {
    "transformer": dict(DEFAULT_CONFIG["transformer"]),
    "cond_tokens": 2,
    "num_labels": 10,
    "image_size": 64,
    "slots": 4,
    "layout": [2, 2],
    "jitter": 4,
    "empty_prob": 0.2,
}


class LabelConditioner(nn.Module):
    """Labels ``[B]`` (0-9, 10 = null) -> (``encoder_hidden_states [B, T, D]``, ``pooled [B, P]``)."""

    def __init__(self, num_labels: int, tokens: int, joint_dim: int, pooled_dim: int):
        super().__init__()
        self.tokens, self.joint_dim = tokens, joint_dim
        self.text = nn.Embedding(num_labels + 1, tokens * joint_dim)
        self.pooled = nn.Embedding(num_labels + 1, pooled_dim)
        nn.init.normal_(self.text.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    def forward(self, labels: torch.Tensor):
        return self.text(labels).view(-1, self.tokens, self.joint_dim), self.pooled(labels)


class SlotConditioner(nn.Module):
    """Slot labels ``[B, S]`` (0-9, 10 = empty, 11 = null) -> (``encoder_hidden_states [B, S*T, D]``,
    ``pooled [B, P]``): each (slot, label) pair has its own ``T`` tokens; the pooled vector is the
    mean over slots of a per-(slot, label) vector."""

    def __init__(self, slots: int, num_labels: int, tokens: int, joint_dim: int, pooled_dim: int):
        super().__init__()
        self.slots, self.vocab, self.tokens, self.joint_dim = slots, num_labels + 2, tokens, joint_dim
        self.text = nn.Embedding(slots * self.vocab, tokens * joint_dim)
        self.pooled = nn.Embedding(slots * self.vocab, pooled_dim)
        nn.init.normal_(self.text.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    def forward(self, labels: torch.Tensor):
        key = labels + self.vocab * torch.arange(self.slots, device=labels.device)
        b = labels.shape[0]
        return self.text(key).view(b, self.slots * self.tokens, self.joint_dim), self.pooled(key).mean(1)


class TinyFlux(nn.Module):
    """The tiny class-conditional FLUX: ``.transformer`` + ``.conditioner``."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = json.loads(json.dumps(config))
        tcfg = dict(config["transformer"])
        tcfg["axes_dims_rope"] = tuple(tcfg["axes_dims_rope"])
        self.transformer = FluxTransformer2DModel(**tcfg)
        self.slots = config.get("slots")
        if self.slots:
            self.conditioner = SlotConditioner(self.slots, config["num_labels"], config["cond_tokens"],
                                               tcfg["joint_attention_dim"], tcfg["pooled_projection_dim"])
            self.empty_label, self.null_label = config["num_labels"], config["num_labels"] + 1
        else:
            self.conditioner = LabelConditioner(
                config["num_labels"], config["cond_tokens"], tcfg["joint_attention_dim"], tcfg["pooled_projection_dim"]
            )
            self.empty_label, self.null_label = None, config["num_labels"]
        self.image_size = config["image_size"]
        self.height = self.width = config["image_size"] // 2

    def encode(self, labels: torch.Tensor):
        """``labels [B]`` (``[B, slots]`` for a scenes model) int64 -> (``prompt_embeds [B, T, D]``, ``pooled [B, P]``)."""
        shape = "[B]" if not self.slots else f"[B, {self.slots}]"
        if labels.dtype != torch.int64 or labels.dim() != (2 if self.slots else 1) or (
                self.slots and labels.shape[1] != self.slots):
            raise ValueError(f"labels must be an int64 {shape} tensor, got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_label):
            raise ValueError(f"labels must be in [0, {self.null_label}] ({self.null_label} = null)")
        return self.conditioner(labels)

    def velocity(self, x: torch.Tensor, sigma, labels: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``eps - x0`` of tokens ``x [B, M, 4]`` at their grid ``ids [M, 3]`` (default: the full grid)."""
        b = x.shape[0]
        enc, pooled = self.encode(labels)
        if ids is None:
            ids = image_ids(self.height, self.width, x.device)
        t = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(b)
        return self.transformer(
            hidden_states=x, encoder_hidden_states=enc.to(x.dtype), pooled_projections=pooled.to(x.dtype),
            timestep=t, img_ids=ids, txt_ids=text_ids(enc.shape[1], x.device), return_dict=False,
        )[0]


def pack_images(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]`` (FluxPipeline's 2 x 2 packing)."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_tokens(tokens: torch.Tensor, height: int = 32, width: int = 32) -> torch.Tensor:
    """Inverse of :func:`pack_images`: ``[B, N, 4C]`` -> ``[B, C, H, W]``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """RoPE ids ``(0, row, col)`` of an ``height x width`` token grid, ``[H*W, 3]`` float."""
    ids = torch.zeros(height, width, 3, device=device)
    ids[..., 1] = torch.arange(height, device=device)[:, None]
    ids[..., 2] = torch.arange(width, device=device)[None, :]
    return ids.view(height * width, 3)


def text_ids(tokens: int, device=None) -> torch.Tensor:
    return torch.zeros(tokens, 3, device=device)


def build_tiny_flux(config: dict | None = None, seed: int = 0) -> TinyFlux:
    """A randomly initialised tiny FLUX, deterministic from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyFlux(config or DEFAULT_CONFIG)


def save_tiny_flux(model: TinyFlux, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config, f, indent=1)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"))


def load_tiny_flux(path: str | None = None, device="cpu", dtype=torch.float32) -> TinyFlux:
    """Load a committed checkpoint by name (:data:`CHECKPOINTS`; default ``"tiny"``) or a folder
    saved by the training script."""
    name = path
    path = CHECKPOINTS.get(path, path) if path else WEIGHTS_DIR
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        hint = f"; its recipe and command are in {os.path.join(WEIGHTS_DIR, 'README.md')}" if name in CHECKPOINTS else ""
        raise FileNotFoundError(f"no tiny FLUX checkpoint at {path} (config.json missing){hint}")
    with open(cfg_file) as f:
        config = json.load(f)
    model = TinyFlux(config)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def sample_dense(
    model: TinyFlux,
    labels: torch.Tensor,
    steps: int = 50,
    generator: torch.Generator | None = None,
    cfg_scale: float = 1.0,
    noise: torch.Tensor | None = None,
    return_tokens: bool = False,
) -> torch.Tensor:
    """Plain FLUX-style Euler sampler on all tokens (the dense reference).

    sigma = linspace(1, 0, steps + 1); y <- y + (sigma_next - sigma) * v. With
    ``cfg_scale != 1`` the velocity is ``v_uncond + cfg_scale * (v_cond - v_uncond)``
    (null label, one batched pass). ``noise [B, 256, 4]`` overrides the draw from
    ``generator``. Returns images ``[B, 1, 32, 32]`` (unclamped) or the tokens.
    """
    p = next(model.parameters())
    labels = labels.to(device=p.device, dtype=torch.int64)
    b = labels.shape[0]
    n = model.height * model.width
    if noise is None:
        noise = torch.randn(b, n, 4, generator=generator, dtype=torch.float32)
    y = noise.to(device=p.device, dtype=p.dtype)
    sig = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    ids = image_ids(model.height, model.width, p.device)
    if cfg_scale != 1.0:
        lab2 = torch.cat([labels, torch.full_like(labels, model.null_label)])
    for s, s_next in zip(sig[:-1], sig[1:]):
        if cfg_scale != 1.0:
            vc, vu = model.velocity(torch.cat([y, y]), s, lab2, ids).chunk(2)
            v = vu + cfg_scale * (vc - vu)
        else:
            v = model.velocity(y, s, labels, ids)
        y = y + (s_next - s) * v
    return y if return_tokens else unpack_tokens(y, model.image_size, model.image_size)
