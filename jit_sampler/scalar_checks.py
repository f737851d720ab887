"""Checks of scalar arguments, one rule each: integers, real numbers, sigma sequences.

Shared by the sampler (:func:`~jit_sampler.jit_sample` / :func:`~jit_sampler.make_plan`), RAS
(:class:`~jit_sampler.RASConfig`, :func:`~jit_sampler.ras_sample`) and the pipelines
(:mod:`jit_sampler.pipelines.checks`, the ControlNet lists). ``TypeError`` for a value of the
wrong kind, ``ValueError`` for one of the right kind out of range; each message starts with the
argument's ``name`` as the caller gives it (``"height"``, ``"RASConfig.num_steps"``, ...).
Imports nothing of the package (NumPy and torch only), so every layer can use it.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

__all__ = ["check_int", "check_real", "check_sigmas", "is_integer", "is_real"]


_INT_KINDS = ("int", "integral", "index")


def is_integer(value, kind: str = "integral") -> bool:
    """Whether ``value`` is an integer of ``kind`` (never a bool).

    - ``"int"``: a Python ``int``. Config fields (:class:`~jit_sampler.JiTConfig`,
      :class:`~jit_sampler.RASConfig`) and the schedules' step counts: a config keeps its fields
      as given, in their documented Python types;
    - ``"integral"``: ``numbers.Integral`` (``int``, NumPy integers). Pipeline call arguments:
      used at once; a tensor would reach the stock pipeline's own code;
    - ``"index"``: anything ``operator.index`` takes, 0-dim integer tensors included. The
      sampler's grid sizes, often read off a tensor's shape.
    """
    if kind not in _INT_KINDS:
        raise ValueError(f"kind must be one of {_INT_KINDS}, got {kind!r}")
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "integral":
        return isinstance(value, numbers.Integral)
    if not hasattr(type(value), "__index__"):
        return False
    try:
        operator.index(value)
    except TypeError:  # e.g. a floating 0-dim tensor
        return False
    return True


def check_int(name: str, value, minimum: int | None = 1, *, kind: str = "integral") -> int:
    """``value`` as an ``int``: an integer of ``kind`` (:func:`is_integer`), ``>= minimum`` (no lower
    bound for ``None``)."""
    if not is_integer(value, kind):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def is_real(value, kind: str = "real") -> bool:
    """Whether ``value`` is a real number of ``kind`` (never a bool; finite or not): ``"real"``,
    ``numbers.Real`` (call arguments); ``"float"``, a Python ``int`` or ``float`` only (the
    documented types of config fields, as ``"int"`` in :func:`is_integer`)."""
    if kind not in ("real", "float"):
        raise ValueError(f"kind must be 'real' or 'float', got {kind!r}")
    return not isinstance(value, bool) and isinstance(value, (int, float) if kind == "float" else numbers.Real)


def check_real(name: str, value, *, allow_none: bool = False, kind: str = "real",
               nonfinite=ValueError) -> float | None:
    """``value`` as a ``float``: a finite real number, not a bool; ``None`` passes (and is returned)
    with ``allow_none``.

    ``kind`` as in :func:`is_real`. ``nonfinite`` is the error
    a NaN or infinity raises: ``ValueError``, except for the entries of the ControlNet lists
    (``controlnet_conditioning_scale``, ``control_guidance_start`` / ``_end``), whose contract is
    one ``TypeError`` ("must be finite real numbers") for any bad entry.
    """
    if value is None and allow_none:
        return None
    if not is_real(value, kind):
        raise TypeError(f"{name} must be a finite real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise nonfinite(f"{name} must be a finite real number, got {value}")
    return float(value)


def check_sigmas(sigmas, steps: int | None = None) -> tuple[float, ...]:
    """``sigmas`` as a tuple of floats: finite, in [0, 1], non-increasing.

    Two forms, on purpose:

    - with ``steps``, the sampler's: the ``steps + 1`` sigmas it integrates (the terminal one
      included), any iterable, each element anything ``float()`` takes except strings and bools
      (NumPy and 0-dim tensor scalars too): the sampler converts them itself;
    - without, a pipeline's ``sigmas`` argument in the stock pipelines' form: one per step (the
      scheduler appends the terminal 0), at least one, a sized sequence (a list, tuple, array or
      1-D tensor) of real numbers: the pipeline takes its length as the step count and hands the
      sequence to the scheduler as it is.
    """
    if steps is None:
        if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__"):
            raise TypeError(f"sigmas must be a sequence of floats, got {type(sigmas).__name__}")
        values = sigmas.tolist() if isinstance(sigmas, (np.ndarray, torch.Tensor)) else list(sigmas)
        if not values:
            raise ValueError("sigmas must hold at least one value, got an empty sequence")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"sigmas must be real numbers, got {type(v).__name__} {v!r}")
        sig = tuple(float(v) for v in values)
    else:
        if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__iter__"):
            raise TypeError(f"sigmas must be a sequence of floats, got {type(sigmas).__name__}")
        sig = []
        for s in sigmas:
            if isinstance(s, (str, bytes, bool)):
                raise TypeError(f"sigmas must be a sequence of floats, got an element {s!r}")
            try:
                sig.append(float(s))
            except (TypeError, ValueError, RuntimeError) as exc:  # complex, None, a multi-element tensor, ...
                raise TypeError(f"sigmas must be a sequence of floats, got an element of type "
                                f"{type(s).__name__}") from exc
        sig = tuple(sig)
        if len(sig) != steps + 1:
            raise ValueError(f"sigmas must have total_steps + 1 = {steps + 1} entries, got {len(sig)}")
    if not all(math.isfinite(s) for s in sig):
        raise ValueError(f"sigmas must be finite, got {sig}")
    # The flow's time runs from 1 to 0: a schedule outside [0, 1] or going back would leave it (a
    # scheduler's shift is monotonic and maps [0, 1] onto itself, so a pipeline's sigmas obey it too).
    if any(not 0.0 <= s <= 1.0 for s in sig) or any(b > a for a, b in zip(sig, sig[1:])):
        raise ValueError(f"sigmas must be non-increasing and in [0, 1], got {sig}")
    return sig
