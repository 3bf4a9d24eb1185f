"""The live loop: a model that keeps learning from annotations while they change.

:class:`LiveTrainer` fine-tunes a copy of a start model in short bursts
(:meth:`LiveTrainer.train`) on the latest snapshot of the annotations
(:meth:`LiveTrainer.submit`, safe from any thread), and predicts with the
weights of the moment (:meth:`LiveTrainer.predict`). It has no Qt in it: the
Fine-tune dock's *Learn while I paint* runs it in a worker thread,
``benchmarks/interactive.py`` runs it in a simulated-user loop.

Every annotated pixel trains (there is no validation part: a few strokes
cannot be split); the loss, crops and augmentation are ``train()``'s. When
the loop ends, :meth:`LiveTrainer.scores` says whether the live weights fit
the annotations better than the start model, and :meth:`LiveTrainer.result`
hands back a model to save (with provenance).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ...model.denseunet import Dropout2d
from ..checks import check_axis, check_classes
from ..devices import autocast, describe_device, grad_scaler, resolve_device
from ..errors import BadInputError
from ..models.model import Model
from .augment import CropBatches, CropCentres
from .data import Sample, build_samples
from .loss import masked_loss
from .schedule import optimizer
from .settings import TrainSettings
from .start import _parent_name, _start_model
from .validation import validation_dice

#: the live loop's training defaults: small batches, so a burst of a few seconds takes steps
LIVE_DEFAULTS = {"batch_size": 4, "crop": 128, "lr": 1e-3, "upsample": "auto", "head": "keep"}
#: steps of linear warm-up of the learning rate after the start
WARMUP_STEPS = 10


class LiveTrainer:
    """Fine-tune ``start`` continuously on the latest annotations.

    ``settings`` / ``overrides`` are :class:`TrainSettings` fields (``epochs``,
    ``max_seconds``, ``val_fraction``, ``patience`` do not apply: the caller
    decides how long each burst is). ``upsample="auto"`` keeps the start
    model's factor. Annotations follow ``train()``'s rules: 0 everywhere on a
    plane means unannotated, unless ``masks`` say which pixels are annotated
    (the dock passes the pixels the user painted).
    """

    def __init__(self, start: Model | str, *, classes: Sequence[str] | None = None,
                 axis: int | None = None, channel_axis: int | None = None,
                 settings: TrainSettings | None = None, **overrides) -> None:
        base = dataclasses.asdict(settings) if settings is not None else dict(LIVE_DEFAULTS)
        base.update(overrides)
        unknown = set(base) - {f.name for f in dataclasses.fields(TrainSettings)}
        if unknown:
            raise TypeError(f"unknown training setting {min(unknown)!r}")
        self.settings = TrainSettings(**base)
        self.settings.validate()
        self.axis = check_axis(axis)
        self.channel_axis = channel_axis
        self.device = resolve_device(self.settings.device)
        self.model, _ = _start_model(start, check_classes(classes), seed=self.settings.seed)
        self.parent = _parent_name(start, self.model)
        if self.settings.upsample != "auto":
            self.model.normalization = self.model.normalization.replace(upsample=int(self.settings.upsample))
        self.start_state = copy.deepcopy(self.model.net.state_dict())
        self.net = self.model.net.to(self.device)
        self.rng = np.random.default_rng(self.settings.seed)
        gen = torch.Generator().manual_seed(self.settings.seed)
        for d in self.net.modules():
            if isinstance(d, Dropout2d):
                d.generator = gen
        self.opt = optimizer(self.net, self.settings)
        self.scaler = grad_scaler(self.device)
        self._lock = threading.Lock()  # guards _pending
        self._pending: tuple | None = None
        self._net_lock = threading.RLock()  # one thread trains or predicts at a time
        self.samples: list[Sample] = []
        self.summary: dict = {}
        self._batches: CropBatches | None = None
        self.steps = 0
        self.snapshots = 0
        self.seconds = 0.0
        self.waiting: str | None = "no annotations yet"

    # ---- annotations --------------------------------------------------------------------------
    def submit(self, images: Sequence, labels: Sequence, masks: Sequence | None = None,
               weights: Sequence | None = None) -> None:
        """The annotations to learn from from the next burst on (any thread; latest wins).

        Pass copies when the arrays may change later (a layer being painted).
        """
        with self._lock:
            self._pending = (list(images), list(labels), None if masks is None else list(masks),
                             None if weights is None else list(weights))

    def _refresh(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        images, labels, masks, weights = pending
        try:
            samples, summary = build_samples(self.model, images, labels, masks, weights, self.axis,
                                             self.channel_axis, val_fraction=None)
        except BadInputError as exc:  # e.g. only background painted so far: wait for more
            self.samples, self._batches, self.waiting = [], None, str(exc)
            return
        self.samples, self.summary, self.waiting = samples, summary, None
        self.snapshots += 1
        centres = CropCentres(samples, self.settings.crop_sampling)
        self._batches = CropBatches(samples, self.settings, centres, self.model.normalization.upsample)

    # ---- learning -----------------------------------------------------------------------------
    def train(self, seconds: float | None = None, steps: int | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
        """One burst: optimisation steps on the latest annotations, for ``seconds`` or ``steps``.

        Returns ``{"steps", "skipped", "loss", "total_steps", "seconds", "waiting"}``:
        ``steps`` taken; ``skipped``: batches whose loss or gradients were not finite, which
        left the weights as they were; ``loss``: the mean over the steps taken (None if none
        was); ``waiting``: why nothing was learnt (no usable annotations yet), else None.
        ``steps`` bounds the batches tried, taken or skipped.
        """
        if seconds is None and steps is None:
            raise BadInputError("give a burst length: seconds or steps")
        self._refresh()
        if self._batches is None:
            return {"steps": 0, "skipped": 0, "loss": None, "total_steps": self.steps,
                    "seconds": 0.0, "waiting": self.waiting}
        losses: list[float] = []
        skipped = 0
        t0 = time.perf_counter()
        with self._net_lock:
            self.net.train()
            while True:
                warm = min(1.0, (self.steps + 1) / WARMUP_STEPS)
                for group in self.opt.param_groups:
                    group["lr"] = self.settings.lr * warm
                x, t, m, w = (a.to(self.device) for a in self._batches(self.rng))
                with autocast(self.device):
                    logits = self.net(x)
                loss = masked_loss(logits, t, m, w, self.model.num_classes, self.settings.dice_weight)
                if self._step(loss):
                    self.steps += 1
                    losses.append(float(loss.detach()))
                else:
                    skipped += 1
                spent = time.perf_counter() - t0
                if steps is not None and len(losses) + skipped >= steps:
                    break
                if seconds is not None and spent >= seconds:
                    break
                if should_stop is not None and should_stop():
                    break
            self.net.eval()
        self.seconds += spent
        return {"steps": len(losses), "skipped": skipped,
                "loss": float(np.mean(losses)) if losses else None, "total_steps": self.steps,
                "seconds": spent, "waiting": None}

    def _step(self, loss: torch.Tensor) -> bool:
        """An optimiser step on ``loss``, unless it or its gradients are not finite: then the
        weights and the optimiser's moments stay as they were. Returns whether it stepped."""
        self.opt.zero_grad(set_to_none=True)
        if not math.isfinite(float(loss.detach())):
            return False
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # the true gradients: checked, then stepped with
        grads = [p.grad for group in self.opt.param_groups for p in group["params"]
                 if p.grad is not None]
        # the largest magnitude: NaN if any gradient is NaN, and no overflow of a sum of squares
        finite = math.isfinite(float(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)))
        if finite:
            self.scaler.step(self.opt)
        self.scaler.update()  # with fp16 scaling, an overflow shrinks the scale for the next batch
        return finite

    # ---- using the weights of the moment --------------------------------------------------------
    def predict(self, image, **kwargs):
        """:func:`~napari_jointattn.engine.inference.segment.segment` with the current weights."""
        from ..inference.segment import segment

        with self._net_lock:
            self.net.eval()
            return segment(image, self.model, device=self.device, axis=kwargs.pop("axis", self.axis),
                           channel_axis=kwargs.pop("channel_axis", self.channel_axis), **kwargs)

    def probabilities(self, plane: np.ndarray, value_range: tuple[float, float] | None = None,
                      branch: str | None = None) -> np.ndarray:
        """Class probabilities (classes, H, W) of one 2-D plane (channels last if several).

        ``value_range``: the stack's intensity range when the model normalises
        per volume (``model.normalization.volume_range(stack)``). ``branch``
        ("pointwise" or "self"): every joint module runs that branch alone
        (``DenseUNet.branch_only``).
        """
        from ..inference.segment import predict_slice
        from ..io.channels import prepare_channels

        data = prepare_channels(np.asarray(plane), self.model.in_channels, self.channel_axis)
        x, _ = self.model.normalization.apply(np.moveaxis(data, -1, 0), value_range)
        alone = self.net.branch_only(branch) if branch else contextlib.nullcontext()
        with self._net_lock, torch.no_grad(), alone:
            self.net.eval()
            out = predict_slice(self.model, x, self.device, tile=512)
        return out[: self.model.num_classes].numpy()

    def disagreement(self, plane: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
        """Per pixel, how far apart the predictions of the point-wise and the self-attention
        branches are (:func:`~.uncertainty.disagreement`, in [0, 1]); a model without joint
        modules has no two branches (``BadInputError``)."""
        from .uncertainty import disagreement

        if not self.net.joint_modules():
            raise BadInputError("this model has no joint attention modules, so no two branches to compare")
        return disagreement(self.probabilities(plane, value_range, branch="pointwise"),
                            self.probabilities(plane, value_range, branch="self"))

    def scores(self) -> dict:
        """Dice on the annotated pixels of the latest snapshot: start model, and live weights.

        These pixels trained the live weights, so ``live`` is optimistic; a
        live score not above ``start`` means nothing was learnt.
        """
        self._refresh()
        if not self.samples:
            return {"start": float("nan"), "live": float("nan"), "improved": False}
        with self._net_lock:
            live = validation_dice(self.model, self.samples, self.device, side="train")
            state = copy.deepcopy(self.net.state_dict())
            self.net.load_state_dict(self.start_state)
            try:
                start = validation_dice(self.model, self.samples, self.device, side="train")
            finally:
                self.net.load_state_dict(state)
        return {"start": start, "live": live, "improved": bool(live > start)}

    def result(self, name: str | None = None) -> Model:
        """A copy of the live model, with provenance, to save or segment with."""
        with self._net_lock:
            model = copy.deepcopy(self.model)
        model.net.eval()
        model.path = None
        if name:
            model.name = name
        model.provenance = {
            **(model.provenance or {}),
            "parent": self.parent,
            "training": {"mode": "live", "steps": self.steps, "snapshots": self.snapshots,
                         "seconds": round(self.seconds, 1), "device": describe_device(self.device),
                         "annotations": {k: v for k, v in self.summary.items() if k != "warnings"},
                         "settings": {k: v for k, v in dataclasses.asdict(self.settings).items()
                                      if k in ("batch_size", "crop", "lr", "augment", "seed", "crop_sampling")}},
        }
        return model
