"""A DenseUNet with spatial attention on its deepest scales.

The structure follows H-DenseUNet (2-D): a DenseNet encoder (dense blocks of
norm-ReLU-1x1-norm-ReLU-3x3 layers, GroupNorm by default, whose outputs are concatenated; transitions
with compression and 2x2 average pooling) and a decoder that upsamples by 2,
adds the encoder feature of the same scale and refines with a 3x3 conv.
Growth rate, depth and widths are scaled down (a config) so that a 512^2
image segments quickly on a CPU; :meth:`DenseUNetConfig.large` is a wider
variant for GPUs.

One attention module (see :mod:`.attention`) sits after the dense block of
each scale listed in ``attention_levels``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import JOINT_FORMS, KINDS, AttentionKey, UnifiedAttention, make_attention

#: the per-module map of what the module changed (see :func:`residual_effect`)
EFFECT_MAP = "effect"

ATTENTION_CHOICES = ("none",) + KINDS
NORMS = ("group", "batch")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """GroupNorm (default) or BatchNorm.

    GroupNorm normalises each image by its own statistics: models generalise
    across images whose feature statistics differ from the training set's
    (BatchNorm's running averages did not), and fine-tuning works with tiny
    batches.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    groups = max(g for g in range(1, 9) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


@dataclass
class DenseUNetConfig:
    """Everything that defines the network's shape. Serialised into model files."""

    in_channels: int = 1
    num_classes: int = 2
    stem_channels: int = 24
    growth: int = 16
    block_layers: tuple[int, ...] = (4, 6, 8, 6)
    bottleneck: int = 4
    compression: float = 0.5
    decoder_channels: tuple[int, ...] = (128, 96, 64, 32, 24)
    head_channels: int = 8
    head_layers: int = 1
    attention: str = "joint"
    joint_form: str = "mix"
    attention_levels: tuple[int, ...] = (1, 2, 3)
    attention_dim: int = 32
    dropout: float = 0.1
    norm: str = "group"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.block_layers = tuple(int(v) for v in self.block_layers)
        self.decoder_channels = tuple(int(v) for v in self.decoder_channels)
        self.attention_levels = tuple(int(v) for v in self.attention_levels)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for a config that cannot build a network."""

        def positive(name: str, value: int) -> None:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("in_channels", "num_classes", "stem_channels", "growth"):
            positive(name, getattr(self, name))
        positive("bottleneck", self.bottleneck)
        positive("head_channels", self.head_channels)
        positive("head_layers", self.head_layers)
        positive("attention_dim", self.attention_dim)
        if not 1 <= len(self.block_layers) <= 6:
            raise ValueError("block_layers needs 1 to 6 dense blocks")
        for n in self.block_layers:
            positive("block_layers entry", n)
        if len(self.decoder_channels) != len(self.block_layers) + 1:
            raise ValueError("decoder_channels needs one width per dense block, plus one")
        for n in self.decoder_channels:
            positive("decoder_channels entry", n)
        if not 0 < self.compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {self.compression!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.joint_form not in JOINT_FORMS:
            raise ValueError(f"joint_form must be one of {JOINT_FORMS}, got {self.joint_form!r}")
        for level in self.attention_levels:
            if not 0 <= level < len(self.block_layers):
                raise ValueError(f"attention level {level} does not exist")

    @property
    def multiple(self) -> int:
        """Input sizes are padded internally to a multiple of this."""
        return 2 ** (len(self.block_layers) + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("block_layers", "decoder_channels", "attention_levels"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DenseUNetConfig:
        d = dict(d)
        # files written before extra output channels were removed say "aux_channels": 0
        aux = d.pop("aux_channels", 0)
        if aux != 0:
            raise ValueError(f"aux_channels {aux!r}: extra output channels are not supported")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def large(cls, **overrides) -> DenseUNetConfig:
        """A wider, deeper variant for GPUs (closer to H-DenseUNet's size)."""
        base = dict(
            stem_channels=64,
            growth=32,
            block_layers=(6, 12, 24, 16),
            decoder_channels=(384, 256, 128, 96, 64),
            head_channels=32,
            attention_dim=64,
        )
        base.update(overrides)
        return cls(**base)


class Dropout2d(nn.Module):
    """Channel dropout that draws from ``generator`` when one is set.

    Training sets a generator of its own, so that a run is reproducible and
    never touches the process's global random state (training runs in a
    worker thread inside napari). Without one, the global RNG is used, as
    ``nn.Dropout2d`` does. No parameters: state dicts are unchanged.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty(x.shape[:2] + (1,) * (x.ndim - 2))  # on the CPU, where the generator is
        keep.bernoulli_(1 - self.p, generator=self.generator)
        return x * keep.to(device=x.device, dtype=x.dtype) / (1 - self.p)


class DenseLayer(nn.Module):
    """Norm-ReLU-1x1(bottleneck*k)-norm-ReLU-3x3(k), output concatenated to input.

    (B, C, H, W) -> (B, C + k, H, W).
    """

    def __init__(self, in_channels: int, growth: int, bottleneck: int, norm: str = "group") -> None:
        super().__init__()
        mid = bottleneck * growth
        self.body = nn.Sequential(
            norm_layer(norm, in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, mid, 1, bias=False),
            norm_layer(norm, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class Transition(nn.Module):
    """Norm-ReLU-1x1 (compression) then 2x2 average pooling. Halves H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group") -> None:
        super().__init__()
        self.body = nn.Sequential(
            norm_layer(norm, in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, norm: str = "group"
):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        norm_layer(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class DenseUNet(nn.Module):
    """Joint-attention DenseUNet: (B, in_channels, H, W) -> (B, K, H, W).

    Any H and W: inputs are padded (edge replication) to a multiple of
    ``config.multiple`` and the output is cropped back.
    """

    def __init__(self, config: DenseUNetConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = DenseUNetConfig(**overrides)
        elif overrides:
            config = DenseUNetConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        c = config
        # Stem: 3x3/2 conv (kept as the 1/2-scale skip) then 2x2 max-pool, as
        # DenseNet's stem reaches 1/4 before the first dense block.
        self.stem = conv_bn_relu(c.in_channels, c.stem_channels, 3, stride=2, norm=c.norm)
        self.pool = nn.MaxPool2d(2)

        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.attention = nn.ModuleDict()
        skip_channels = [c.stem_channels]
        ch = c.stem_channels
        for level, n_layers in enumerate(c.block_layers):
            layers = []
            for _ in range(n_layers):
                layers.append(DenseLayer(ch, c.growth, c.bottleneck, c.norm))
                ch += c.growth
            self.blocks.append(nn.Sequential(*layers))
            if c.attention != "none" and level in c.attention_levels:
                self.attention[f"level{level}"] = make_attention(
                    c.attention,
                    ch,
                    value_dim=c.attention_dim,
                    key_dim=c.attention_dim,
                    joint_form=c.joint_form,
                )
            skip_channels.append(ch)
            if level < len(c.block_layers) - 1:
                out = max(1, int(math.floor(ch * c.compression)))
                self.transitions.append(Transition(ch, out, c.norm))
                ch = out

        # Decoder: from the deepest block up to 1/2 (the stem), adding the
        # same-scale encoder feature after each x2 upsampling (H-DenseUNet).
        dec = c.decoder_channels
        self.bridge = conv_bn_relu(skip_channels[-1], dec[0], kernel=1, norm=c.norm)
        self.laterals = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i, skip_ch in enumerate(reversed(skip_channels[:-1])):
            self.laterals.append(nn.Conv2d(skip_ch, dec[i], 1, bias=False))
            self.fuse.append(conv_bn_relu(dec[i], dec[i + 1], norm=c.norm))
        self.dropout = Dropout2d(c.dropout)
        n_out = c.num_classes
        self.classifier = nn.Conv2d(dec[-1], n_out, 1)
        # Classifying at 1/2 and upsampling is cheap; a small residual head at
        # full resolution sees the input again so boundaries stay sharp.
        # ``head_layers`` 3x3 convolutions: more than one gives thin structures
        # (a cortical ribbon two voxels thick) capacity at full resolution.
        head: list[nn.Module] = []
        ch_in = n_out + c.in_channels
        for _ in range(c.head_layers):
            head += [nn.Conv2d(ch_in, c.head_channels, 3, padding=1), nn.ReLU(inplace=True)]
            ch_in = c.head_channels
        self.refine = nn.Sequential(*head, nn.Conv2d(c.head_channels, n_out, 1))

    # ------------------------------------------------------------------
    def head_modules(self) -> list[nn.Module]:
        """The classifier head (1/2-resolution classifier and full-resolution refinement)."""
        return [self.classifier, *self.refine]

    def attention_keys(self) -> list[tuple[AttentionKey, UnifiedAttention]]:
        """(key, module) for every attention module, shallow first."""
        out = []
        for level_key, module in self.attention.items():
            level = int(level_key.removeprefix("level"))
            out.append((AttentionKey(module.kind, self.stride(level)), module))
        return out

    def attention_modules(self) -> list[tuple[str, UnifiedAttention]]:
        """(display name, module), e.g. ``("joint 1/16", module)``, shallow first."""
        return [(key.name, module) for key, module in self.attention_keys()]

    def map_keys(self) -> list[AttentionKey]:
        """The key of every per-pixel map :meth:`inspect` returns, in order.

        Each module's own maps (:attr:`map_names`), then its ``effect``: the
        size of its residual update relative to its input, per pixel.
        """
        return [key.with_map(m) for key, module in self.attention_keys()
                for m in (*module.map_names, EFFECT_MAP)]

    @contextlib.contextmanager
    def knocked_out(self, names: Iterable[str] | None = None):
        """Within the block, the attention modules ``names`` (``key.name``,
        e.g. ``"joint 1/8"``; all when None) pass their input through unchanged."""
        modules = {key.name: module for key, module in self.attention_keys()}
        chosen = list(modules) if names is None else list(names)
        unknown = [n for n in chosen if n not in modules]
        if unknown:
            raise ValueError(f"no attention module {unknown[0]!r}; modules: {', '.join(modules) or 'none'}")
        before = {n: modules[n].enabled for n in chosen}
        for n in chosen:
            modules[n].enabled = False
        try:
            yield
        finally:
            for n, state in before.items():
                modules[n].enabled = state

    def joint_modules(self) -> list[UnifiedAttention]:
        """The joint attention modules (the ones with two branches), shallow first."""
        return [m for _, m in self.attention_keys() if m.kind == "joint"]

    @contextlib.contextmanager
    def branch_only(self, branch: str):
        """Within the block, every joint module uses one branch alone: ``"pointwise"``
        (``y_i = m_i v_i``) or ``"self"`` (``y_i = softmax_j(s_ij) v_j``), in both
        joint forms; the other kinds are unchanged. ``ValueError`` without a joint module."""
        if branch not in ("pointwise", "self"):
            raise ValueError(f"branch must be 'pointwise' or 'self', got {branch!r}")
        joint = self.joint_modules()
        if not joint:
            raise ValueError("the network has no joint attention module: it has no two branches")
        for m in joint:
            m.branch = branch
        try:
            yield
        finally:
            for m in joint:
                m.branch = None

    @staticmethod
    def stride(level: int) -> int:
        """Downsampling factor of dense block ``level`` (the stem quarters)."""
        return 2 ** (level + 2)

    def _pad(self, x: Tensor) -> Tensor:
        m = self.config.multiple
        h, w = x.shape[-2:]
        # at least 2 x 2 cells at the deepest scale, so GroupNorm always has
        # more than one value per group
        ph = max(-(-h // m) * m, 2 * m) - h
        pw = max(-(-w // m) * m, 2 * m) - w
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        xp = self._pad(x)
        f = self.stem(xp)
        skips = [f]
        f = self.pool(f)
        for level, block in enumerate(self.blocks):
            f = block(f)
            key = f"level{level}"
            if key in self.attention:
                f = self.attention[key](f)
            skips.append(f)
            if level < len(self.transitions):
                f = self.transitions[level](f)

        y = self.bridge(skips[-1])
        for i, skip in enumerate(reversed(skips[:-1])):
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            y = self.fuse[i](y + self.laterals[i](skip))
        y = self.classifier(self.dropout(y))
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        out = y + self.refine(torch.cat([y, xp], dim=1))
        return out[..., :h, :w]

    @torch.no_grad()
    def inspect(
        self, x: Tensor, query: tuple[int, int] | None = None
    ) -> tuple[Tensor, dict[str, dict[str, Tensor]]]:
        """Forward plus attention maps for display.

        Returns ``(logits, maps)`` where ``maps[key.name][map_name]`` (``key`` from
        :meth:`attention_keys`, e.g. ``maps["joint 1/8"]["mix"]``) is a
        (B, h, w) tensor at the module's feature resolution, covering the
        input (h = ceil(H / stride)). Map names: ``pointwise``, ``mix`` (joint
        "mix" form), ``effect`` (every module: :func:`residual_effect`, what
        the module actually changed there) and, when ``query=(row, col)`` in input pixels is given,
        ``row``: where that pixel's global attention looks (sums to 1 over the
        whole padded feature map).
        """
        captured: dict[str, Tensor] = {}
        hooks = []
        # hooks fire for every forward of this instance: record only this call's
        owner = threading.get_ident()
        for key, module in self.attention.items():

            def hook(_mod, args, output, key=key):
                if threading.get_ident() == owner:
                    captured[key] = (args[0], output)

            hooks.append(module.register_forward_hook(hook))
        try:
            logits = self(x)
        finally:
            for handle in hooks:
                handle.remove()

        h, w = x.shape[-2:]
        out: dict[str, dict[str, Tensor]] = {}
        for (akey, module), key in zip(self.attention_keys(), self.attention.keys()):
            feats, updated = captured[key]
            s = akey.stride
            fh, fw = math.ceil(h / s), math.ceil(w / s)
            maps = {k: v[:, :fh, :fw] for k, v in module.maps(feats).items()}
            maps[EFFECT_MAP] = residual_effect(feats, updated)[:, :fh, :fw]
            if query is not None and module.has_global_row:
                qy = min(max(int(query[0]), 0), h - 1) // s
                qx = min(max(int(query[1]), 0), w - 1) // s
                row = module.attention_row(feats, qy * feats.shape[-1] + qx)
                maps["row"] = row[:, :fh, :fw]
            out[akey.name] = maps
        return logits, out


def residual_effect(x: Tensor, z: Tensor) -> Tensor:
    """|z - x| / |x| per pixel (norms over channels): how much a residual module changed its input."""
    return (z - x).float().norm(dim=1) / x.float().norm(dim=1).clamp_min(1e-6)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
