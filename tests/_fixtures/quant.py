"""GGUF files written offline with the ``gguf`` package, for the quantized-transformer tests."""

from __future__ import annotations

import torch


def write_gguf(path, state: dict, qtype_name: str) -> dict:
    """Write ``state`` (diffusers key names) to a GGUF file: 2-D weights whose rows are whole 32-value blocks
    quantized to ``qtype_name`` (``"Q8_0"``, ``"Q4_0"``), the rest float32 (as FLUX GGUF files keep norms
    and biases). Returns the quantized weights dequantized by the ``gguf`` package, rounded to fp16 (the
    precision in which diffusers' GGUF layers dequantize)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    writer = gguf.GGUFWriter(str(path), "flux")
    dequantized = {}
    for name, tensor in state.items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0 and name.endswith(".weight"):
            q = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, q, raw_dtype=qtype)
            dequantized[name] = torch.from_numpy(gguf.quants.dequantize(q, qtype).copy()).half()
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized
