"""jit_eval: the evaluation bench of jit-diffusion (not part of the installed library).

What proves the sampler without FLUX weights: the embedded tiny FLUX and its digit
classifier (:mod:`jit_eval.tiny_flux`), image metrics (:mod:`jit_eval.metrics`), rival
samplers and cost counters (:mod:`jit_eval.rivals`), the main-job demo
(``python -m jit_eval.demo``) and the data-parallel example (:mod:`jit_eval.distributed`).
It imports the library (``jit_kernels``, ``jit_sampler``); the library never imports it,
except the ``jit-flux`` CLI, which reaches the embedded model lazily when no ``--model`` is
given. It ships in the source tree, not in the wheel: run it from a checkout.
"""

import jit_sampler  # noqa: F401,E402  (its import quiets known third-party notices before diffusers loads)
