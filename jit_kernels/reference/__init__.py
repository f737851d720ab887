"""Plain-PyTorch references: the specification of every op, imported by tests and benchmarks."""

from .importance import select_new_tokens_ref, token_importance_ref, token_topk_published
from .lift import gaussian_blur_ref, lift_euler_ref_, lift_field_published, lift_field_ref, nearest_anchor_map_ref
from .microflow import microflow_target_ref, microflow_update_ref_
from .tokens import gather_tokens_ref, scatter_tokens_ref, scatter_tokens_ref_

__all__ = [
    "gather_tokens_ref",
    "scatter_tokens_ref",
    "scatter_tokens_ref_",
    "nearest_anchor_map_ref",
    "gaussian_blur_ref",
    "lift_field_ref",
    "lift_euler_ref_",
    "lift_field_published",
    "token_importance_ref",
    "select_new_tokens_ref",
    "token_topk_published",
    "microflow_update_ref_",
    "microflow_target_ref",
]
