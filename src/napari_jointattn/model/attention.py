"""Spatial attention in one unified formula, and its instances.

Every module here computes, for a feature map ``x`` with N = H*W positions,

    y_i = sum_j A_ij(x) g(x_j)          z_i = x_i + gamma * W_z y_i

where ``g`` is a 1x1 "value" projection, ``W_z`` a 1x1 output projection and
``gamma`` a scalar initialised to 0, so a fresh module is the identity.
The instances differ only in the N x N matrix ``A``:

* :class:`PointwiseAttention`: ``A = diag(m)``, ``m_i = sigmoid(w^T x_i + b)``.
* :class:`SelfAttention`: ``A_ij = softmax_j(q_i . k_j / sqrt(d))``.
* :class:`JointAttention`: both at once, in one of two forms:

  - ``"mix"`` (default): ``A = diag((1 - lam) * m) + diag(lam) S`` with a
    per-pixel mixing map ``lam_i = sigmoid(u^T x_i)``: each pixel chooses how
    much of its context is local (point-wise) and how much global.
  - ``"gated"``: ``A_ij = softmax_j(s_ij + log m_j)``: the point-wise map
    decides where global context is drawn from.

Two paths exist for every module:

* ``forward`` -- the fast path used for segmentation and training. Global
  aggregation goes through ``scaled_dot_product_attention`` (fused kernels,
  O(N d) memory); ``A`` is never built.
* ``explicit_matrix`` / ``maps`` / ``attention_row`` -- the inspection path
  used only to *show* attention. ``explicit_matrix`` is O(N^2) and exists for
  verification on small inputs; ``attention_row`` is O(N d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

JOINT_FORMS = ("mix", "gated")


@dataclass(frozen=True)
class AttentionKey:
    """Which attention module (``map`` None), or which of its per-pixel maps.

    ``kind`` is the module's kind (``"joint"``), ``stride`` the downsampling
    of its feature map (8 for 1/8 of the input), ``map`` a map name
    (``"pointwise"``, ``"mix"``). :attr:`name` is the display string, e.g.
    ``"joint 1/8"`` or ``"joint 1/8 mix"``; nothing parses it back.
    """

    kind: str
    stride: int
    map: str | None = None

    @property
    def name(self) -> str:
        module = f"{self.kind} 1/{self.stride}"
        return module if self.map is None else f"{module} {self.map}"

    @property
    def module(self) -> AttentionKey:
        """The key of the module this map belongs to."""
        return replace(self, map=None)

    def with_map(self, map_name: str) -> AttentionKey:
        return replace(self, map=map_name)

    def __str__(self) -> str:
        return self.name


def _flat(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, N, C)."""
    return t.flatten(2).transpose(1, 2)


def _unflat(t: Tensor, height: int, width: int) -> Tensor:
    """(B, N, C) -> (B, C, H, W)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], height, width)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v without materialising the N x N matrix.

    ``(B, N, dk), (B, N, dk), (B, N, dv) -> (B, N, dv)``.

    PyTorch's fused CPU kernel needs equal head dimensions for q, k and v and
    silently falls back to an O(N^2) path otherwise, as it does for inputs
    whose last dimension is not contiguous. Zero-padding the smaller side keeps
    the result exact (zeros add nothing to q.k and the padded value columns are
    dropped) while staying on the fused kernel.
    """
    dk, dv = q.shape[-1], v.shape[-1]
    if dk < dv:
        q = F.pad(q, (0, dv - dk))
        k = F.pad(k, (0, dv - dk))
    elif dv < dk:
        v = F.pad(v, (0, dk - dv))
    q, k, v = (t.unsqueeze(1).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale).squeeze(1)
    return out[..., :dv]


class UnifiedAttention(nn.Module):
    """Base of all instances: residual ``z = x + gamma * W_z(A g(x))``.

    Subclasses implement :meth:`aggregate` (fast ``y``) and
    :meth:`explicit_matrix` (reference ``A``).
    """

    kind: str = ""
    #: whether :meth:`attention_row` exists (a global, softmax part of ``A``)
    has_global_row: bool = False

    @classmethod
    def create(cls, channels: int, *, value_dim: int | None = None, key_dim: int | None = None,
               joint_form: str = "mix") -> UnifiedAttention:
        """Build from the network config's attention settings (those this kind uses)."""
        return cls(channels, value_dim)

    def __init__(self, channels: int, value_dim: int | None = None) -> None:
        super().__init__()
        value_dim = value_dim or max(8, channels // 2)
        self.channels = channels
        self.value_dim = value_dim
        self.value = nn.Conv2d(channels, value_dim, 1)
        self.out = nn.Conv2d(value_dim, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    #: False knocks the module out: it passes its input through unchanged
    #: (``DenseUNet.knocked_out``; not saved with the weights)
    enabled: bool = True

    # fast path -----------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if not self.enabled:
            return x
        return x + self.gamma * self.out(self.aggregate(x))

    def aggregate(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """(B, C, H, W) -> y of shape (B, value_dim, H, W)."""
        raise NotImplementedError

    # inspection / reference path -----------------------------------------
    def explicit_matrix(self, x: Tensor) -> Tensor:  # pragma: no cover
        """The full attention matrix ``A``: (B, C, H, W) -> (B, N, N). O(N^2)."""
        raise NotImplementedError

    def forward_explicit(self, x: Tensor) -> Tensor:
        """The unified formula evaluated literally with an explicit ``A``."""
        b, _, h, w = x.shape
        a = self.explicit_matrix(x)
        y = torch.bmm(a, _flat(self.value(x)))
        return x + self.gamma * self.out(_unflat(y, h, w))

    @property
    def map_names(self) -> tuple[str, ...]:
        """Names of the per-pixel maps :meth:`maps` returns, in order."""
        return ()

    def maps(self, x: Tensor) -> dict[str, Tensor]:
        """Per-pixel maps at feature resolution: name -> (B, H, W), one per :attr:`map_names`."""
        return {}

    def attention_row(self, x: Tensor, index: int) -> Tensor:
        """Row ``index`` of the global (softmax) part of ``A``: (B, H, W).

        Rows sum to 1. O(N d) time and memory.
        """
        raise ValueError(f"{self.kind} attention has no global attention row")


class _GateMixin:
    """A per-pixel sigmoid gate ``m_i = sigmoid(w^T x_i + b)``."""

    gate: nn.Conv2d

    def gate_map(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1, H, W) in (0, 1)."""
        return torch.sigmoid(self.gate(x))


class _QueryKeyMixin:
    """Query/key projections and their scaled scores."""

    query: nn.Conv2d
    key: nn.Conv2d
    key_dim: int

    def query_key(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> q, k each (B, N, key_dim)."""
        return _flat(self.query(x)), _flat(self.key(x))

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.key_dim)

    def scores_row(self, x: Tensor, index: int) -> Tensor:
        """Logits of one query against all keys: (B, N)."""
        q, k = self.query_key(x)
        return torch.einsum("bd,bnd->bn", q[:, index], k) * self.scale

    def scores(self, x: Tensor) -> Tensor:
        """All logits, (B, N, N). Reference path only."""
        q, k = self.query_key(x)
        return torch.bmm(q, k.transpose(1, 2)) * self.scale


class PointwiseAttention(_GateMixin, UnifiedAttention):
    """Diagonal ``A``: each pixel rescales its own value. Sharp, no context."""

    kind = "pointwise"

    def __init__(self, channels: int, value_dim: int | None = None) -> None:
        super().__init__(channels, value_dim)
        self.gate = nn.Conv2d(channels, 1, 1)

    def aggregate(self, x: Tensor) -> Tensor:
        return self.gate_map(x) * self.value(x)

    def explicit_matrix(self, x: Tensor) -> Tensor:
        return torch.diag_embed(self.gate_map(x).flatten(1))

    @property
    def map_names(self) -> tuple[str, ...]:
        return ("pointwise",)

    def maps(self, x: Tensor) -> dict[str, Tensor]:
        return {"pointwise": self.gate_map(x)[:, 0]}


class SelfAttention(_QueryKeyMixin, UnifiedAttention):
    """Dense softmax ``A`` (non-local block): every pixel gathers from all."""

    kind = "self"
    has_global_row = True

    @classmethod
    def create(cls, channels: int, *, value_dim: int | None = None, key_dim: int | None = None,
               joint_form: str = "mix") -> SelfAttention:
        return cls(channels, value_dim, key_dim)

    def __init__(
        self, channels: int, value_dim: int | None = None, key_dim: int | None = None
    ) -> None:
        super().__init__(channels, value_dim)
        self.key_dim = key_dim or self.value_dim
        self.query = nn.Conv2d(channels, self.key_dim, 1)
        self.key = nn.Conv2d(channels, self.key_dim, 1)

    def aggregate(self, x: Tensor) -> Tensor:
        q, k = self.query_key(x)
        y = fused_attention(q, k, _flat(self.value(x)), self.scale)
        return _unflat(y, x.shape[2], x.shape[3])

    def explicit_matrix(self, x: Tensor) -> Tensor:
        return torch.softmax(self.scores(x), dim=-1)

    def attention_row(self, x: Tensor, index: int) -> Tensor:
        row = torch.softmax(self.scores_row(x, index), dim=-1)
        return row.reshape(x.shape[0], x.shape[2], x.shape[3])


class JointAttention(_GateMixin, _QueryKeyMixin, UnifiedAttention):
    """Point-wise and self-attention in one ``A`` (see module docstring)."""

    kind = "joint"
    has_global_row = True

    @classmethod
    def create(cls, channels: int, *, value_dim: int | None = None, key_dim: int | None = None,
               joint_form: str = "mix") -> JointAttention:
        return cls(channels, value_dim, key_dim, form=joint_form)

    def __init__(
        self,
        channels: int,
        value_dim: int | None = None,
        key_dim: int | None = None,
        form: str = "mix",
    ) -> None:
        if form not in JOINT_FORMS:
            raise ValueError(f"joint form must be one of {JOINT_FORMS}, got {form!r}")
        super().__init__(channels, value_dim)
        self.form = form
        self.key_dim = key_dim or self.value_dim
        self.query = nn.Conv2d(channels, self.key_dim, 1)
        self.key = nn.Conv2d(channels, self.key_dim, 1)
        self.gate = nn.Conv2d(channels, 1, 1)
        if form == "mix":
            self.mix = nn.Conv2d(channels, 1, 1)

    #: None: both branches, as trained; "pointwise" or "self": that branch alone
    #: (``DenseUNet.branch_only``: the two branches' disagreement; not saved with the weights)
    branch: str | None = None

    def mix_map(self, x: Tensor) -> Tensor:
        """lam: (B, C, H, W) -> (B, 1, H, W), how global each pixel's context is."""
        return torch.sigmoid(self.mix(x))

    def aggregate(self, x: Tensor) -> Tensor:
        h, w = x.shape[2], x.shape[3]
        v = self.value(x)
        if self.branch == "pointwise":  # y_i = m_i v_i
            return self.gate_map(x) * v
        q, k = self.query_key(x)
        if self.branch == "self":  # y_i = softmax_j(s_ij) v_j
            return _unflat(fused_attention(q, k, _flat(v), self.scale), h, w)
        m = self.gate_map(x)
        if self.form == "mix":
            lam = self.mix_map(x)
            glob = _unflat(fused_attention(q, k, _flat(v), self.scale), h, w)
            return (1 - lam) * m * v + lam * glob
        # gated: softmax_j(s_ij + log m_j) v_j = (S (m v))_i / (S m)_i, where
        # S is the plain softmax; the extra value column carries the normaliser.
        mf = _flat(m)
        o = fused_attention(q, k, torch.cat([mf * _flat(v), mf], dim=-1), self.scale)
        y = o[..., :-1] / o[..., -1:].clamp_min(torch.finfo(o.dtype).tiny)
        return _unflat(y, h, w)

    def explicit_matrix(self, x: Tensor) -> Tensor:
        s = self.scores(x)
        if self.form == "mix":
            m = self.gate_map(x).flatten(1)
            lam = self.mix_map(x).flatten(1)
            return torch.diag_embed((1 - lam) * m) + lam.unsqueeze(-1) * torch.softmax(
                s, dim=-1
            )
        return torch.softmax(s + F.logsigmoid(self.gate(x)).flatten(1).unsqueeze(1), dim=-1)

    @property
    def map_names(self) -> tuple[str, ...]:
        return ("pointwise", "mix") if self.form == "mix" else ("pointwise",)

    def maps(self, x: Tensor) -> dict[str, Tensor]:
        out = {"pointwise": self.gate_map(x)[:, 0]}
        if self.form == "mix":
            out["mix"] = self.mix_map(x)[:, 0]
        return out

    def attention_row(self, x: Tensor, index: int) -> Tensor:
        s = self.scores_row(x, index)
        if self.form == "gated":
            s = s + F.logsigmoid(self.gate(x)).flatten(1)
        return torch.softmax(s, dim=-1).reshape(x.shape[0], x.shape[2], x.shape[3])


#: every attention kind by name: a new variant is one class and one line here
ATTENTION_TYPES: dict[str, type[UnifiedAttention]] = {
    "pointwise": PointwiseAttention,
    "self": SelfAttention,
    "joint": JointAttention,
}
KINDS = tuple(ATTENTION_TYPES)


def make_attention(
    kind: str,
    channels: int,
    value_dim: int | None = None,
    key_dim: int | None = None,
    joint_form: str = "mix",
) -> UnifiedAttention:
    """Build one instance of the unified formula by name."""
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"attention kind must be one of {KINDS}, got {kind!r}")
    return ATTENTION_TYPES[kind].create(channels, value_dim=value_dim, key_dim=key_dim,
                                        joint_form=joint_form)
