"""An independent transcription of the published RAS step for SD3 (github.com/microsoft/RAS), for parity tests.

Written from the published code's behaviour, in its own shape, not from ``jit_sampler.ras``:
the settings object, the RAS flow-matching Euler scheduler (works on the ``[1, C, H, W]``
latent, expands token indices to latent pixels, square images only), the joint attention
processor with its K/V cache in the processor object, and the transformer forward that keeps
the computed tokens after the patch embedding and scatters the output into zeros. Batch 1, as
published; one settings object per installation instead of the module global.

``install(pipe, settings)`` turns a stock ``StableDiffusion3Pipeline`` into the published RAS
pipeline (scheduler, forward, processors), and its stock ``__call__`` then runs RAS.
``settings.log`` records ``(step, computed token count)`` of every transformer forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler


class Settings:
    """The published settings object, with its step flags."""

    def __init__(self, *, height, width, num_steps=30, sample_ratio=0.5, start=4, end=30, resets=(12, 22),
                 metric="std", starvation_scale=0.1, high_ratio=1.0, skip_num_step=0, skip_num_step_length=0,
                 patch_size=2, vae_size=8):
        self.height, self.width = height, width
        self.num_steps, self.sample_ratio = num_steps, sample_ratio
        self.start, self.end, self.resets = start, end, list(resets)
        self.metric, self.starvation_scale, self.high_ratio = metric, starvation_scale, high_ratio
        self.skip_num_step, self.skip_num_step_length = skip_num_step, skip_num_step_length
        self.patch_size, self.vae_size = patch_size, vae_size
        self.current_step = 0
        self.is_ras = self.is_next_ras = False
        self.cached_index = self.computed_index = self.cached_output = None
        self.log = []
        self.skip_list = self._skip_list()

    def _skip_list(self):
        tok_h = (self.height // self.patch_size) // self.vae_size
        tok_w = (self.width // self.patch_size) // self.vae_size
        avg = int((1 - self.sample_ratio) * tok_h * tok_w)
        out = []
        if self.skip_num_step_length == 0:
            out = [avg for _ in range(self.num_steps)]
            for i in self.resets:
                out[i] = 0
            for i in range(self.start):
                out[i] = 0
            return out
        L = self.skip_num_step_length
        for i in range(self.num_steps // L + 1):
            for j in range(L):
                if i * L + j >= self.num_steps:
                    break
                v = avg + self.skip_num_step * (i - (((self.num_steps + self.start) // L) // 2))
                out.append((v // 64) * 64)
        for i in range(self.start):
            out[i] = 0
        for i in self.resets:
            out[i] = 0
        assert all(0 <= v <= tok_h * tok_w for v in out)
        return out

    def _flags(self, cur, next_inclusive):
        self.is_ras = self.start <= cur <= self.end and cur not in self.resets
        nxt = cur + 1
        in_range = nxt <= self.end if next_inclusive else nxt < self.end
        self.is_next_ras = self.start <= nxt and in_range and nxt not in self.resets

    def reset(self):
        self.cached_index = self.computed_index = self.cached_output = None
        self.current_step = 0
        self._flags(0, True)

    def advance(self):
        self.current_step += 1
        self._flags(self.current_step, False)


class Scheduler(FlowMatchEulerDiscreteScheduler):
    """The published RAS Euler step on ``[1, C, H, W]`` latents (set ``self.ras`` after construction)."""

    ras: Settings = None
    drop_count = None

    def _pixels(self, tokens, height):
        p = self.ras.patch_size
        base = tokens // (height // p) * p * height + tokens % (height // p) * p
        offsets = torch.tensor([0, height + 1, 1, height], dtype=tokens.dtype, device=tokens.device)
        return (base[:, None] + offsets[None, :]).flatten()

    def _select(self, diff, height, width):
        s, p = self.ras, self.ras.patch_size
        d = diff.squeeze(0).permute(1, 2, 0)
        per_pixel = torch.std(d, dim=-1) if s.metric == "std" else torch.norm(d, p=2, dim=-1)
        score = per_pixel.view(height // p, p, width // p, p).transpose(-2, -3).mean(-1).mean(-1).view(-1)
        score *= torch.exp(s.starvation_scale * self.drop_count)
        n_skip = s.skip_list[self._step_index + 1]
        order = torch.sort(score, dim=0, descending=False).indices
        low = int(n_skip * (1 - s.high_ratio))
        high = int(n_skip * s.high_ratio)
        cached = torch.cat([order[:low], order[-high:]])
        computed = order[low:-high]
        self.drop_count[cached] += 1
        return self._pixels(cached, height), computed

    def step(self, model_output, timestep, sample, return_dict=False, **_):
        s = self.ras
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.drop_count is None or self._step_index == 0:
            p = s.patch_size
            self.drop_count = torch.zeros(sample.shape[-2] // p * sample.shape[-1] // p,
                                          device=sample.device) - len(self.sigmas)
        if self._step_index == 0:
            s.reset()
        c, height, width = sample.shape[-3:]
        if s.sample_ratio < 1.0 and s.is_ras:
            model_output.squeeze(0).view(c, -1)[:, s.cached_index] = s.cached_output
        sample = sample.to(torch.float32)
        diff = (self.sigmas[self.step_index + 1] - self.sigmas[self.step_index]) * model_output
        prev = (sample + diff).to(model_output.dtype)
        if s.sample_ratio < 1.0 and s.is_next_ras:
            cached_pixels, computed = self._select(diff, height, width)
            s.cached_output = model_output.squeeze(0).view(c, -1)[:, cached_pixels]
            s.cached_index = cached_pixels
            s.computed_index = computed
        self._step_index += 1
        s.advance()
        if s.current_step >= s.num_steps:
            s.reset()
        return (prev,)


class Processor:
    """The published SD3 joint attention with its K/V cache (no q/k norms: SD3 medium's layout)."""

    def __init__(self, ras: Settings):
        self.ras = ras
        self.k_cache = self.v_cache = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        s = self.ras
        m = hidden_states.shape[1]
        b = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if s.sample_ratio < 1.0 and s.current_step == 0:
            self.k_cache = self.v_cache = None
        if s.sample_ratio < 1.0 and (s.current_step == s.start - 1 or s.current_step in s.resets):
            self.k_cache, self.v_cache = key, value
        if s.sample_ratio < 1.0 and s.is_ras:
            self.k_cache[:, s.computed_index] = key
            self.v_cache[:, s.computed_index] = value
            key, value = self.k_cache, self.v_cache
        if s.sample_ratio < 1.0 and s.current_step > s.end:
            self.k_cache = self.v_cache = None
        head_dim = key.shape[-1] // attn.heads
        if encoder_hidden_states is not None:
            query = torch.cat([query, attn.add_q_proj(encoder_hidden_states)], dim=1)
            key = torch.cat([key, attn.add_k_proj(encoder_hidden_states)], dim=1)
            value = torch.cat([value, attn.add_v_proj(encoder_hidden_states)], dim=1)
        q = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)
        if encoder_hidden_states is not None:
            out, enc = out[:, :m], out[:, m:]
            if not attn.context_pre_only:
                enc = attn.to_add_out(enc)
            return attn.to_out[1](attn.to_out[0](out)), enc
        return attn.to_out[1](attn.to_out[0](out))


def _forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
             block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True, skip_layers=None):
    s = self._published_ras
    height, width = hidden_states.shape[-2:]
    hidden_states = self.pos_embed(hidden_states)
    temb = self.time_text_embed(timestep, pooled_projections)
    encoder_hidden_states = self.context_embedder(encoder_hidden_states)
    if s.sample_ratio < 1.0 and s.is_ras:
        hidden_states = hidden_states[:, s.computed_index]
    s.log.append((s.current_step, hidden_states.shape[1]))
    for block in self.transformer_blocks:
        encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                     encoder_hidden_states=encoder_hidden_states, temb=temb)
    hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
    p = self.config.patch_size
    h, w = height // p, width // p
    if s.sample_ratio < 1.0 and s.is_ras:
        full = torch.zeros((hidden_states.shape[0], h * w, hidden_states.shape[2]), device=hidden_states.device,
                           dtype=hidden_states.dtype)
        full[:, s.computed_index] = hidden_states
        hidden_states = full
    hidden_states = hidden_states.reshape(hidden_states.shape[0], h, w, p, p, self.out_channels)
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    out = hidden_states.reshape(hidden_states.shape[0], self.out_channels, h * p, w * p)
    return (out,)


def install(pipe, settings: Settings):
    """Make the stock SD3 ``pipe`` the published RAS pipeline with ``settings`` (modifies ``pipe``)."""
    sched = Scheduler.from_config(pipe.scheduler.config)
    sched.ras = settings
    pipe.scheduler = sched
    tr = pipe.transformer
    tr._published_ras = settings
    tr.forward = types.MethodType(_forward, tr)
    for block in tr.transformer_blocks:
        block.attn.set_processor(Processor(settings))
    return pipe
