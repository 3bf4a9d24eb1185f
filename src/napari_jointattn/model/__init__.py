"""Pure-PyTorch model core: the unified attention formula and the DenseUNet."""

from .attention import (
    ATTENTION_TYPES,
    AttentionKey,
    JointAttention,
    PointwiseAttention,
    SelfAttention,
    UnifiedAttention,
    fused_attention,
    make_attention,
)
from .denseunet import DenseUNet, DenseUNetConfig, count_parameters

__all__ = [
    "ATTENTION_TYPES",
    "AttentionKey",
    "DenseUNet",
    "DenseUNetConfig",
    "JointAttention",
    "PointwiseAttention",
    "SelfAttention",
    "UnifiedAttention",
    "count_parameters",
    "fused_attention",
    "make_attention",
]
