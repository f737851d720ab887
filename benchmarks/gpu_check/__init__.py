"""GPU proof kit: one command that checks and times jit_kernels and jit_sampler on a CUDA machine.

    python -m benchmarks.gpu_check --out DIR                    # a CUDA machine (sized for 8 minutes on an H200)
    python -m benchmarks.gpu_check --out DIR --build            # first build jit_kernels._C for this GPU
    python -m benchmarks.gpu_check --out DIR --section parity   # one section (env always runs)
    python -m benchmarks.gpu_check --out DIR --dry-run          # the same code paths on CPU, tiny shapes

Sections, in run order (each with a time budget; a section that runs out of budget stops
early and says how much it left out; ``--budget-scale`` stretches every budget):

- ``env``: versions, the GPU, and that the ``cuda`` and ``triton`` backends are there (with
  the build command for this GPU when ``jit_kernels._C`` lacks its CUDA kernels).
- ``parity``: every public op on ``cuda`` and compiled ``triton`` against ``reference``:
  fp32 / fp16 / bf16, shared and per-sample indices, strided inputs, odd grids (7 x 13, 1 x 17,
  9 x 1, a grid smaller than the blur radius), 64 x 64 at B = 1 and 8, 128 x 128, nearest-map
  ties under permuted anchor lists, in-place ops on strided destinations, and anchor attention
  at 512 + 1310 and 512 + 4096 tokens with 24 x 128 heads, with and without ``key_lengths``.
  Index ops and copies must be bit-exact; the rest within :func:`jit_kernels.testing.tolerance`.
- ``bad_inputs``: invalid calls on the device, each in a child process (an out-of-bounds write
  can poison a CUDA context): the exception type, then a healthy context and a clean exit.
- ``sampler``: ``jit_sample`` with a small velocity function: kernel launches per step
  (torch.profiler), host syncs per step (``torch.cuda.set_sync_debug_mode``: counted with
  ``"warn"``, then ``"error"`` on the steps between stage transitions, which must not sync),
  and index-validation passes per step (``jit_kernels.validation_passes``; zero between
  transitions).
- ``bench``: first the lift family under ``JIT_KERNELS_LIFT_VARIANT=v1`` and ``v2`` (the A/B of the
  kernel changes, outputs compared bit for bit); then every op timed with ``triton.testing.do_bench``
  (quantiles 0.2 / 0.5 / 0.8) against the plain torch composition (benchmarks/cases.py) and the copy
  bandwidth measured in the same run; anchor attention against rotary + SDPA (benchmarks/bench_attention.py).
- ``e2e``: a ``diffusers.FluxTransformer2DModel`` with FLUX.1-dev's real configuration and
  random bf16 weights made on the GPU, 1024 x 1024 (4096 image + 512 text tokens): dense 50
  steps vs JiT 4x / 7x / reference, with and without the fused anchor attention, through
  ``jit_sample`` + ``FluxVelocity``: wall and transformer time, FLOP ratios, sampler overhead.
  ``--e2e-steps K`` times K dense steps and extrapolates to 50 (default: as many as fit).
  Then the bf16 peak memory of the stock loop (FluxPipeline's: all tokens every step) vs JiT 7x
  with and without the fused attention (``memory``), and the nf4 check: a tiny bitsandbytes nf4
  transformer under ``enable_model_cpu_offload`` + ``enable_jit`` (``nf4``). Both CUDA only; the
  dry run records why they were skipped.
- ``sanitizer``: ``compute-sanitizer --tool memcheck`` over ``--section parity --small`` in a
  child process, when ``compute-sanitizer`` is on PATH.

Writes ``DIR/gpu_check.json`` (keys ``ok``, ``env``, ``parity``, ``sampler``, ``syncs``, ``bench``,
``e2e``, ``bad_inputs``, ``sanitizer``, ``sections``, ``failures``, ``known_issues``; rewritten
after every section, so a killed run leaves what it had) and ``DIR/gpu_check.md``; exits 1 on any
failure.

``--dry-run`` runs the same code on CPU with tiny shapes: Triton through its interpreter
(``TRITON_INTERPRET=1``, set before jit_kernels is imported), ``cpp`` standing in for
``cuda``, a 2 + 2 block FLUX at a 16 x 16 grid, a CPU timer for ``do_bench``, and
validation passes per step where the GPU run counts syncs. It proves the kit runs, not the GPU.

The package, one module per part (``python -m benchmarks.gpu_check`` runs :func:`cli.main`):

- ``common``: constants, budgets, the run's state (``Kit``, ``Budget``), the Triton mode switch,
  small helpers shared by the sections.
- ``build``: the ``--build`` step and the CUDA toolkit lookup.
- ``env``, ``parity``, ``bad_inputs``, ``sampler``, ``bench``, ``e2e``, ``sanitizer``: one section each;
  ``memory`` (peak memory, stock vs JiT) and ``nf4`` (the bitsandbytes row) are parts of ``e2e``.
- ``report``: ``gpu_check.json`` / ``gpu_check.md``.
- ``cli``: arguments, budgets, the section loop, and the child-process entry points.

No module imports ``jit_kernels`` at import time: the Triton mode (``TRITON_INTERPRET``) must be
set first (``common._prepare_env``).
"""

from __future__ import annotations

# The names below are re-exported so ``from benchmarks import gpu_check as gc; gc.main(...)`` keeps working.
# To replace a function for a test, patch the module that defines it (``gc.parity.parity_groups``).
from .common import (  # noqa: F401
    _dname,
    BUDGET_DRY,
    BUDGET_GPU,
    Budget,
    CHILD_TAG,
    DIFFUSERS_HINT,
    Kit,
    ROOT,
    SECTIONS,
    _exact_fp32,
    _gen,
    _interpret_on,
    _prepare_env,
    _quiet_fd2,
    _text,
)
from .build import (  # noqa: F401
    _cuda_home_with_runtime,
    _toolkit_dirs,
    _torch_cuda_home,
    build_command,
    run_build,
)
from .env import (  # noqa: F401
    _backends_under_test,
    section_env,
)
from .parity import (  # noqa: F401
    ALL,
    KNOWN_ISSUES,
    PCase,
    Spec,
    _inactive,
    _strided_copy,
    attention_cases,
    compare,
    parity_groups,
    parity_plan,
    parity_shards,
    run_parity_child,
    run_parity_groups,
    run_probes,
    section_parity,
    strided_destination_probes,
    tie_cases,
    token_cases,
)
from .bad_inputs import (  # noqa: F401
    _health,
    bad_cases,
    run_bad_child,
    section_bad_inputs,
)
from .sampler import (  # noqa: F401
    StepProbe,
    _field,
    _passes,
    count_launches,
    section_sampler,
)
from .bench import (  # noqa: F401
    VARIANT_BUDGET_SHARE,
    VARIANT_OPS,
    _quantile,
    bench_variants,
    copy_bandwidth_GBps,
    section_bench,
    time_ms,
)
from .e2e import (  # noqa: F401
    build_random_flux,
    flux_config,
    section_e2e,
)
from .sanitizer import (  # noqa: F401
    _find_sanitizer,
    _sanitizer_errors,
    section_sanitizer,
)
from .report import (  # noqa: F401
    _fmt_q,
    write_report,
)
from .cli import (  # noqa: F401
    main,
    parse_args,
    sanitizer_seconds,
)
