"""Every hot op twice (torch reference `*_ref`, Triton twin `*_triton`) behind one public name.

Imports nothing of ours outside `kernels`.
"""

from loraplex.kernels.attention import (
    paged_attention,
    paged_attention_ref,
    write_kv,
    write_kv_ref,
)
from loraplex.kernels.dispatch import KernelArgumentError, step_memo, use_triton
from loraplex.kernels.dora import dora_scale, dora_scale_ref
from loraplex.kernels.fused import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
    rope,
    rope_ref,
    rope_write_kv,
    rope_write_kv_ref,
    silu_mul,
    silu_mul_ref,
)
from loraplex.kernels.lora import (
    lora_expand,
    lora_expand_ref,
    lora_expand_segments,
    lora_expand_segments_ref,
    lora_shrink,
    lora_shrink_ref,
    lora_shrink_segments,
    lora_shrink_segments_ref,
)
from loraplex.kernels.lora_slices import (
    lora_apply,
    lora_apply_ref,
    lora_apply_segments,
    lora_apply_segments_ref,
)
from loraplex.kernels.shira import shira_gather, shira_gather_ref

__all__ = [
    "KernelArgumentError",
    "add_rms_norm",
    "add_rms_norm_ref",
    "dora_scale",
    "dora_scale_ref",
    "lora_apply",
    "lora_apply_ref",
    "lora_apply_segments",
    "lora_apply_segments_ref",
    "lora_expand",
    "lora_expand_ref",
    "lora_expand_segments",
    "lora_expand_segments_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "lora_shrink_segments",
    "lora_shrink_segments_ref",
    "paged_attention",
    "paged_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope",
    "rope_ref",
    "rope_write_kv",
    "rope_write_kv_ref",
    "shira_gather",
    "shira_gather_ref",
    "silu_mul",
    "silu_mul_ref",
    "step_memo",
    "use_triton",
    "write_kv",
    "write_kv_ref",
]
