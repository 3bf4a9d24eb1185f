"""Pure-PyTorch model core: the unified attention formula and the DenseUNet."""

from .attention import (
    JointAttention,
    PointwiseAttention,
    SelfAttention,
    UnifiedAttention,
    fused_attention,
    make_attention,
)
from .denseunet import DenseUNet, DenseUNetConfig, count_parameters

__all__ = [
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
