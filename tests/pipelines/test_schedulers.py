"""Which schedulers a JiT run honours (docs/method.md, "Schedulers"), on the tiny FLUX.1 pipeline.

JiT takes the sigmas from the scheduler and integrates them with its own Euler steps: every
sigma option of FlowMatchEulerDiscreteScheduler is honoured when the run uses the scheduler's
sigmas, and a scheduler whose update rule is not Euler is refused before any model runs.
"""

import warnings

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                       FlowMatchLCMScheduler, UniPCMultistepScheduler)

from tests._fixtures.flux import build_pipe, prompt_inputs, stock_pipe
from jit_sampler import JiTConfig, enable_jit
from jit_sampler.pipelines import JiTFluxImg2ImgPipeline

KW = dict(height=64, width=64, output_type="latent")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def base():
    return build_pipe()


def with_scheduler(base, scheduler):
    """A stock FluxPipeline over ``base``'s modules with ``scheduler`` (``base`` is left as it is)."""
    return stock_pipe(base, scheduler=scheduler)


def euler(base, **options):
    return FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config, **options)


class Forwards:
    """Counts transformer forwards."""

    def __init__(self, transformer):
        self.tr, self.n = transformer, 0

    def __enter__(self):
        self.handle = self.tr.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


REFUSED = {
    "heun": (lambda b: FlowMatchHeunDiscreteScheduler.from_config(b.scheduler.config), "FlowMatchHeunDiscrete"),
    "lcm": (lambda b: FlowMatchLCMScheduler.from_config(b.scheduler.config), "FlowMatchLCM"),
    "euler-stochastic": (lambda b: euler(b, stochastic_sampling=True), "stochastic_sampling=True"),
    "euler-inverted": (lambda b: euler(b, invert_sigmas=True), "invert_sigmas=True"),
    "dpm-solver++-flow": (lambda b: DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                                prediction_type="flow_prediction"),
                          "DPMSolverMultistep"),
    "unipc-flow": (lambda b: UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                     prediction_type="flow_prediction"), "UniPCMultistep"),
}


@pytest.mark.parametrize("schedule", ["beta", "pipeline"])
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_update_rules_are_refused_before_any_work(base, name, schedule):
    """Before: each of these ran JiT's Euler and returned the plain Euler result bit for bit."""
    make, what = REFUSED[name]
    pipe = enable_jit(with_scheduler(base, make(base)), "7x")
    with Forwards(base.transformer) as fw, pytest.raises(ValueError, match=what) as info:
        pipe(generator=gen(), jit=JiTConfig.preset("7x", sigma_schedule=schedule), **KW, **prompt_inputs())
    assert fw.n == 0
    msg = str(info.value)
    assert "JiT integrates its own Euler steps" in msg and "jit=None" in msg


def test_refused_scheduler_still_runs_stock(base):
    """jit=None is the stock pipeline whatever the scheduler; the JiT call is refused with the same one."""
    make, _ = REFUSED["unipc-flow"]
    pipe = enable_jit(with_scheduler(base, make(base)), "7x")
    out = pipe(generator=gen(), jit=None, num_inference_steps=2, **KW, **prompt_inputs()).images
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="UniPCMultistep"):
        pipe(generator=gen(), **KW, **prompt_inputs())


def test_img2img_refuses_too(base):
    """The rule is checked once for every JiT pipeline (the shared dispatch), img2img included."""
    img = stock_pipe(base, JiTFluxImg2ImgPipeline, scheduler=euler(base, stochastic_sampling=True))
    with pytest.raises(ValueError, match="stochastic_sampling"):
        img(image=torch.rand(1, 3, 64, 64), strength=0.8, generator=gen(), jit="7x", **KW, **prompt_inputs())


SPACINGS = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "shift-terminal": {"shift_terminal": 0.1},
    "static-shift": {"use_dynamic_shifting": False, "shift": 3.0},
    "linear-time-shift": {"time_shift_type": "linear"},
}


@pytest.mark.parametrize("name", sorted(SPACINGS))
def test_sigma_options_are_honoured_on_the_pipeline_schedule(base, name):
    """With the scheduler's sigmas (``sigma_schedule="pipeline"``) a dense JiT run is the stock
    FluxPipeline run with that scheduler: the same sigmas, the same latents."""
    stock = with_scheduler(base, euler(base, **SPACINGS[name]))
    ref = stock(generator=gen(), num_inference_steps=5, **KW, **prompt_inputs()).images
    stock_sigmas = stock.scheduler.sigmas.tolist()
    pipe = enable_jit(stock, "7x")
    got = pipe(generator=gen(), jit=JiTConfig.dense(5, sigma_schedule="pipeline"), **KW, **prompt_inputs()).images
    assert pipe.last_jit_report.sigmas == pytest.approx(stock_sigmas, abs=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # and the JiT preset on that schedule integrates those sigmas too
    pipe(generator=gen(), jit=JiTConfig.preset("7x", sigma_schedule="pipeline"), num_inference_steps=5, **KW,
         **prompt_inputs())
    assert pipe.last_jit_report.sigmas == pytest.approx(stock_sigmas, abs=1e-6)


def test_explicit_sigmas_go_through_the_scheduler_options(base):
    """Explicit ``sigmas`` are spaced by the scheduler as the stock pipeline spaces them."""
    stock = with_scheduler(base, euler(base, use_karras_sigmas=True))
    given = [1.0, 0.8, 0.6, 0.4]
    stock(generator=gen(), sigmas=given, **KW, **prompt_inputs())
    pipe = enable_jit(stock, "7x")
    pipe(generator=gen(), sigmas=given, **KW, **prompt_inputs())
    assert pipe.last_jit_report.sigmas == pytest.approx(stock.scheduler.sigmas.tolist(), abs=1e-6)


@pytest.mark.parametrize("name", ["karras", "exponential"])
def test_beta_schedule_warns_that_it_replaces_the_spacing(base, name):
    """The presets' Beta table replaces a spacing option of the scheduler: a warning names it
    (before: silently the Beta result, bit for bit)."""
    pipe = enable_jit(with_scheduler(base, euler(base, **SPACINGS[name])), "7x")
    option = next(iter(SPACINGS[name]))
    with pytest.warns(UserWarning, match=rf"replaces the scheduler's {option}=.*sigma_schedule='pipeline'"):
        pipe(generator=gen(), **KW, **prompt_inputs())
    assert pipe.last_jit_report.sigmas[1] == pytest.approx(0.9973, abs=1e-4)  # the Beta table


@pytest.mark.parametrize("name", ["default", "shift-terminal", "static-shift"])
def test_shift_options_run_without_warning(base, name):
    """Shift options are part of a checkpoint's native schedule (Qwen-Image ships shift_terminal=0.02)."""
    pipe = enable_jit(with_scheduler(base, euler(base, **SPACINGS[name])), "7x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(generator=gen(), **KW, **prompt_inputs())


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_ras_calls_refuse_other_update_rules_too(family):
    """RAS integrates its own Euler steps as JiT does: the same check, naming ras=, before any model runs."""
    from tests._fixtures import sd3
    from jit_sampler import RASConfig, enable_ras

    stock = build_pipe() if family == "flux" else sd3.build_pipe()
    stock.scheduler = FlowMatchHeunDiscreteScheduler.from_config(stock.scheduler.config)
    pipe = enable_ras(stock, RASConfig(num_steps=6, scheduler_start_step=2, error_reset_steps=()))
    pipe.set_progress_bar_config(disable=True)
    inputs = prompt_inputs() if family == "flux" else sd3.prompt_inputs()
    with Forwards(stock.transformer) as fw, pytest.raises(ValueError, match="FlowMatchHeunDiscrete") as info:
        pipe(generator=gen(), **KW, **inputs)
    assert fw.n == 0
    msg = str(info.value)
    assert "RAS integrates its own Euler steps" in msg and "ras=None" in msg
