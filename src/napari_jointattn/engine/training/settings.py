"""Training settings and what a run returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..checks import check_seed, finite_number
from ..errors import BadInputError
from ..models.model import Model
from .split import SPLITS


@dataclass
class TrainSettings:
    epochs: int = 30
    max_seconds: float | None = None
    steps_per_epoch: int = 40
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    #: the training/validation split (``engine.training.split``): "auto" (the first of
    #: images, slices, strip that keeps every class on both sides) or one of them
    split: str = "auto"
    patience: int = 8
    augment: bool = True
    scale_range: tuple[float, float] = (0.75, 1.33)
    bias_field: float = 0.0
    seed: int = 0
    device: str = "auto"
    #: crop centres: "classes" (class-balanced) or "annotated" (see CropCentres)
    crop_sampling: str = "classes"
    #: validate every this many steps (and at every epoch end); 0: a quarter epoch
    val_every: int = 0
    #: two-class models: choose the foreground probability threshold on the validation pixels
    calibrate_threshold: bool = True
    #: weight of the soft Dice term of the loss (cross-entropy has weight 1)
    dice_weight: float = 1.0
    #: the classifier head: "auto" (re-initialised when the start model does not
    #: find the annotated structures), "keep" or "reset"
    head: str = "auto"
    #: in-plane enlargement the network works at: "auto" (2 for structures
    #: thinner than ``THIN_PIXELS``, else the start model's), or 1 to 4; kept in
    #: the model (``normalization.upsample``) so segmenting does the same
    upsample: str | int = "auto"
    #: validate (and keep) an exponential moving average of the weights with
    #: this decay per step (0: the raw weights); see docs/training.md
    ema: float = 0.0
    #: probability of a smooth random deformation of each crop (MONAI ``Rand2DElasticd``:
    #: control points 32 px apart, displacements of about 2-7 px); 0: none
    elastic: float = 0.0

    def validate(self) -> None:
        """Every setting's type and range, before any data is read (``BadInputError``)."""

        def integer(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise BadInputError(f"{name} must be an integer {span}, got {v!r}")

        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, np.integer)) or self.epochs < 1:
            raise BadInputError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.max_seconds is not None:
            finite_number(self.max_seconds, "max_seconds", 0, lo_open=True)
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise BadInputError(f"validation fraction must be in (0, 1), got {self.val_fraction!r}")
        integer("crop", 32, 8192)
        integer("batch_size", 1, 4096)
        integer("steps_per_epoch", 1)
        integer("patience", 0)
        finite_number(self.lr, "learning rate", 0, 10, lo_open=True)
        finite_number(self.weight_decay, "weight_decay", 0, 10)
        finite_number(self.bias_field, "bias_field", 0, 1)
        check_seed(self.seed)
        sr = self.scale_range
        if not isinstance(sr, (tuple, list)) or len(sr) != 2:
            raise BadInputError(f"scale_range must be (low, high), got {sr!r}")
        lo = finite_number(sr[0], "scale_range low", 0, lo_open=True)
        hi = finite_number(sr[1], "scale_range high", 0, 10)
        if not lo <= 1 <= hi or hi / lo > 100:
            raise BadInputError(f"scale_range must satisfy 0 < low <= 1 <= high <= 10, got {tuple(sr)!r}")
        if not isinstance(self.augment, (bool, np.bool_)):
            raise BadInputError(f"augment must be true or false, got {self.augment!r}")
        if self.crop_sampling not in ("classes", "annotated"):
            raise BadInputError(f"crop_sampling must be 'classes' or 'annotated', got {self.crop_sampling!r}")
        if not isinstance(self.val_every, int) or self.val_every < 0:
            raise BadInputError(f"val_every must be a non-negative integer, got {self.val_every!r}")
        if self.upsample != "auto" and (isinstance(self.upsample, bool) or self.upsample not in (1, 2, 3, 4)):
            raise BadInputError(f"upsample must be 'auto' or an integer in [1, 4], got {self.upsample!r}")
        finite_number(self.ema, "ema", 0, 1)
        finite_number(self.elastic, "elastic", 0, 1)
        if self.ema >= 1:
            raise BadInputError(f"ema must be in [0, 1), got {self.ema!r}")
        if self.split not in SPLITS:
            raise BadInputError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {self.split!r}")
        if self.head not in ("auto", "keep", "reset"):
            raise BadInputError(f"head must be 'auto', 'keep' or 'reset', got {self.head!r}")


@dataclass
class TrainResult:
    model: Model
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_step: int = 0
    best_dice: float = float("nan")
    start_dice: float = float("nan")
    improved: bool = False
    warnings: list[str] = field(default_factory=list)
    stopped: str = "epochs"
    seconds: float = 0.0
    device: str = "cpu"
    summary: dict = field(default_factory=dict)
    path: os.PathLike | None = None
