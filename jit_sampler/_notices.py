"""Known third-party import notices that say nothing to a user of this package, dropped by name.

Importing diffusers' pipelines and models prints a few notices about optional packages that
are installed but unused, or used through a fallback that works:

- transformers: "`XImageProcessor` requires torchvision (not installed); falling back to
  `XImageProcessorPil`" (the PIL fallback is what the pipelines use anyway);
- torchao, when its release is older than the installed torch (torchao 0.18 under torch 2.13):
  "Failed to load .../torchao/_C*.so" (its optional CUDA / C++ kernels), torch's
  "<enum ...> is an Enum subclass and is now natively supported by torch.compile" deprecation
  for torchao's enums, and diffusers' "Unable to import `torchao` Tensor objects" (its
  safe-globals list for torchao checkpoints; weight-only quantization through
  ``TorchAoConfig`` works without it, see tests/pipelines/test_quantized.py).

Each filter sits on the one logger that emits the notice and matches its text; every other
record passes. Installed when :mod:`jit_sampler` is imported, before anything imports diffusers.
"""

from __future__ import annotations

import logging

__all__ = ["install"]

# logger name -> substrings that must all occur in a dropped record's message
_NOTICES: dict[str, tuple[tuple[str, ...], ...]] = {
    "transformers.utils.import_utils": (("requires torchvision (not installed)", "falling back to"),),
    "torchao": (("Failed to load", "torchao/_C"),),
    "torch.utils._pytree": (("is an Enum subclass and is now natively supported by torch.compile",),),
    "diffusers.quantizers.torchao.torchao_quantizer": (("Unable to import `torchao` Tensor objects",),),
}


class _KnownNotice(logging.Filter):
    def __init__(self, patterns: tuple[tuple[str, ...], ...]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(all(p in msg for p in pattern) for pattern in self.patterns)


def install() -> None:
    """Add the filters (idempotent)."""
    for name, patterns in _NOTICES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _KnownNotice) for f in log.filters):
            log.addFilter(_KnownNotice(patterns))
