"""JiT's avoidable discontinuities are gone (docs/method.md section 9): the micro-flow noise of a token
depends on its position only, not on its rank in the importance order or on the other new tokens."""

import torch

from jit_sampler import JiTConfig, jit_sample
from jit_sampler.sampler import _dmf_noise


def _eps(new, fields=None, seed=0):
    cfg = JiTConfig.preset("7x")
    y = torch.zeros(2, 16, 3)
    return _dmf_noise(cfg, torch.tensor(new), y, {} if fields is None else fields, torch.Generator().manual_seed(seed))


def test_noise_follows_the_token_not_its_rank():
    """Before: R rows drawn in importance order, so a swap of two ranks swapped their noise."""
    a, b = _eps([5, 9, 2]), _eps([2, 5, 9])
    torch.testing.assert_close(a[:, [0, 1, 2]], b[:, [1, 2, 0]], rtol=0, atol=0)


def test_noise_does_not_depend_on_the_other_new_tokens():
    """Before: one token more or less shifted the rows of every token drawn after it."""
    a, b = _eps([5, 9, 2]), _eps([7, 5, 2, 9])
    torch.testing.assert_close(a, b[:, [1, 3, 2]], rtol=0, atol=0)


def test_later_transitions_read_the_same_field():
    fields = {}
    first = _eps([1, 2], fields)
    second = _eps([3, 4], fields, seed=123)  # the field is drawn once per run: the generator is not used again
    whole = _eps(list(range(16)))
    torch.testing.assert_close(torch.cat([first, second], 1), whole[:, 1:5], rtol=0, atol=0)


def test_run_is_deterministic_and_seed_sensitive():
    def velocity(x, active, sigma, step):
        return torch.sin(3 * x) + 0.1 * active.float().reshape(1, -1, 1)

    noise = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(3))
    cfg = JiTConfig.preset("7x")
    sig = [1 - k / 11 for k in range(12)]
    a, _ = jit_sample(velocity, noise, 8, 8, sig, cfg, torch.Generator().manual_seed(0))
    b, _ = jit_sample(velocity, noise, 8, 8, sig, cfg, torch.Generator().manual_seed(0))
    c, _ = jit_sample(velocity, noise, 8, 8, sig, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
