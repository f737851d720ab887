"""Triton kernels of the jit_kernels ops: not implemented yet.

When present, each op registers ``torch.ops.jit_kernels.<op>_triton`` here; until then
``available_backends()`` does not list ``"triton"`` and an explicit ``backend="triton"``
raises ``BackendUnavailableError``.
"""

__all__: list[str] = []
