"""The training loop: ``train()``, and :class:`_Run`, the state of one run and its steps."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ...model.denseunet import Dropout2d
from ..checks import check_axis, check_classes, check_output_file, check_run_files
from ..devices import autocast, describe_device, grad_scaler, resolve_device
from ..models.model import Model, save_model
from .augment import CropBatches, CropCentres
from .checkpoint import _jsonable, _load_checkpoint, _save_checkpoint
from .data import build_samples
from .distributed import Parallel, training_device
from .ema import WeightAverage
from .loss import masked_loss
from .schedule import learning_rate, optimizer
from .settings import TrainResult, TrainSettings
from .start import _decide_head, _decide_upsample, _fmt, _parent_name, _start_model
from .validation import calibrate_threshold, validation_dice


def train(
    start: Model | str | os.PathLike | None,
    images: Sequence,
    labels: Sequence,
    *,
    masks: Sequence | None = None,
    weights: Sequence | None = None,
    axis: int | None = None,
    channel_axis: int | None = None,
    classes: Sequence[str] | None = None,
    settings: TrainSettings | None = None,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    provenance: dict | None = None,
    callback: Callable[[dict], bool | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    save_unchanged: bool = True,
    **overrides,
) -> TrainResult:
    """Fine-tune ``start`` on annotated images; return the best model (and save it to ``out``).

    ``callback`` gets ``{"stage": "train", "epoch", "epochs", "step", "steps",
    "loss", "val_dice", "best_dice", "seconds"}`` after every step (``val_dice``
    None) and after every validation (``val_dice`` set; the first, with
    ``epoch`` 0, is the start model's score; ``epoch_end`` True at the end of
    an epoch); returning ``False`` stops training, keeping the best
    weights so far. Validation runs every ``val_every`` steps and at each
    epoch end, so a short time budget can still pick trained weights.

    The start model is scored on the validation pixels first; if no later
    validation beats it, ``result.improved`` is False, ``result.warnings``
    says so, and so does the saved file's metadata. ``save_unchanged=False``
    then writes no file at all (``result.path`` stays None).
    ``out`` is written once, atomically, at the end (also after a stop).
    ``checkpoint``: a file written atomically after every epoch; if it exists
    when training starts (same data and settings), training resumes from it.
    It is removed once training has finished.

    Under ``torch.distributed`` with several processes (``torchrun``, see
    :mod:`.distributed`), the processes share each batch and together take
    the steps one process would take with the same ``batch_size``; rank 0
    validates, writes ``checkpoint`` and ``out``, and every process returns
    the same result.
    """
    settings = _settings(settings, overrides)
    if out is not None:
        out = check_output_file(out)
    check_run_files(out, checkpoint)
    classes = check_classes(classes)
    axis = check_axis(axis)
    device = training_device(resolve_device(settings.device))
    par = Parallel(device)
    par.check_batch(settings.batch_size)
    model, head_reset = _start_model(start, classes, seed=settings.seed)
    parent_name = _parent_name(start, model)
    samples, summary = build_samples(model, images, labels, masks, weights, axis, channel_axis,
                                     settings.val_fraction, settings.split)
    run = _Run(model, samples, summary, settings, device, par, callback, head_reset)
    with par.main_file(checkpoint) as resume_from:  # every process resumes from rank 0's checkpoint
        if resume_from:
            run.restore(resume_from)
    if run.first_epoch == 1:  # the bar to beat, first in every progress report
        run.tell({"epoch": 0, "step": 0, "loss": None, "val_dice": run.start_dice,
                  "best_dice": run.start_dice, "seconds": 0.0})
    ddp = par.wrap(run.net)  # what the steps run through (``run.net`` itself with one process)
    for epoch in range(run.first_epoch, settings.epochs + 1):
        run.epoch(ddp, epoch, checkpoint)
        if run.stop:
            break
    del ddp
    training = run.finish()
    result = run.result
    model.name = name or model.name
    model.scores = {"val_dice": _rounded(run.best), "start_val_dice": _rounded(run.start_dice)}
    from ..models.fit import data_statistics

    model.provenance = {
        "parent": parent_name,
        "data": summary,
        "data_statistics": data_statistics(images, channel_axis=channel_axis),
        "settings": _jsonable(vars(settings)),
        "training": training,
        **(provenance or {}),
    }
    if out is not None and (result.improved or save_unchanged):  # rank 0 writes, the others wait
        result.path = par.from_main(lambda: save_model(model, out))
    if checkpoint is not None and par.is_main and os.path.exists(checkpoint):
        os.remove(checkpoint)
    par.barrier()
    return result


def _rounded(dice: float) -> float | None:
    return round(dice, 6) if math.isfinite(dice) else None


def _settings(settings: TrainSettings | None, overrides: dict) -> TrainSettings:
    """A validated copy of ``settings`` (the defaults when None) with ``overrides`` set."""
    settings = dataclasses.replace(settings) if settings is not None else TrainSettings()
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise TypeError(f"unknown training setting {key!r}")
        setattr(settings, key, value)
    settings.validate()
    return settings


class _Run:
    """One training run: the network, its optimiser and generators, the counters, and the steps.

    :meth:`checkpoint_state` is the one place that builds the counters a checkpoint keeps and
    :meth:`restore` the one place that reads them back; with the weights, optimiser, loss scale
    and generator states saved beside them, a resumed run takes exactly the steps an
    uninterrupted one would.
    """

    def __init__(self, model: Model, samples: list, summary: dict, settings: TrainSettings,
                 device: torch.device, par: Parallel,
                 callback: Callable[[dict], bool | None] | None, head_reset: bool) -> None:
        self.model, self.samples, self.summary, self.settings = model, samples, summary, settings
        self.device, self.par, self.callback = device, par, callback
        self.warnings: list[str] = list(summary.get("warnings", []))
        # generators of this run's own: training runs in a worker thread inside napari,
        # and must neither reseed nor draw from the process's global random state
        self.rng = np.random.default_rng(settings.seed)
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.net = model.net.to(device)
        self.dropouts = [m for m in self.net.modules() if isinstance(m, Dropout2d)]
        for d in self.dropouts:
            d.generator = self.gen
        par.shard_dropout(self.dropouts, settings.batch_size)
        # the bar to beat, and what is handed back if nothing beats it: the start model as given
        # (before any head reset; with a new number of classes its head is new anyway)
        self.best_state = copy.deepcopy(self.net.state_dict())
        self.start_dice = self.best = self._score()
        # the start model as given is the bar (above); trained weights work at this scale
        self.start_normalization = model.normalization
        self.upsample, self.upsample_note = _decide_upsample(model, samples, settings.upsample)
        model.normalization = model.normalization.replace(upsample=self.upsample)
        self.head = _decide_head(model, samples, settings.head, device, reset_already=head_reset,
                                 seed=settings.seed)
        self.opt = optimizer(self.net, settings)
        self.scaler = grad_scaler(device)
        self.ema = WeightAverage(self.net, settings.ema)
        self.val_every = settings.val_every or max(1, settings.steps_per_epoch // 4)
        self.batches = CropBatches(samples, settings, CropCentres(samples, settings.crop_sampling),
                                   self.upsample)
        self.result = TrainResult(model=model, best_dice=self.best, start_dice=self.start_dice,
                                  device=describe_device(device), summary=summary)
        self.result.history.append({"epoch": 0, "step": 0, "loss": None, "val_dice": self.best,
                                    "seconds": 0.0})
        self.fingerprint = json.dumps({"data": summary, "settings": _jsonable(vars(settings))},
                                      sort_keys=True)
        self.t0 = time.perf_counter()
        self.stop: str | None = None
        self.first_epoch = 1
        self.step_no = 0  # optimisation steps so far
        self.improved_epoch = 0  # the last epoch whose validation beat the best so far

    # ---- resuming -----------------------------------------------------------------------------
    def checkpoint_state(self, epoch: int) -> dict:
        """The counters to continue from after ``epoch`` (JSON; the tensors go beside them)."""
        return {"epoch": epoch, "best": self.best, "best_epoch": self.result.best_epoch,
                "best_step": self.result.best_step, "improved_epoch": self.improved_epoch,
                "step_no": self.step_no, "history": self.result.history, "elapsed": self.seconds(),
                "scaler": self.scaler.state_dict()}

    def save(self, path: str | os.PathLike, epoch: int) -> None:
        _save_checkpoint(path, self.net, self.opt, self.best_state, self.rng, self.gen,
                         self.fingerprint, self.checkpoint_state(epoch), extra=self.ema.tensors())

    def restore(self, path: str | os.PathLike) -> None:
        """Continue from the checkpoint at ``path``: as if the epochs it holds had just run here."""
        state = _load_checkpoint(path, self.net, self.opt, self.best_state, self.rng, self.gen,
                                 self.fingerprint)
        self.best, self.step_no = state["best"], state["step_no"]
        self.improved_epoch = state["improved_epoch"]
        self.result.best_epoch, self.result.best_step = state["best_epoch"], state["best_step"]
        self.result.history = state["history"]
        self.first_epoch = state["epoch"] + 1
        self.t0 -= state["elapsed"]
        self.ema = WeightAverage(self.net, self.settings.ema, state["extra"])
        if state.get("scaler"):  # empty or absent when the checkpointed run had no fp16 scaling
            self.scaler.load_state_dict(state["scaler"])

    # ---- training -----------------------------------------------------------------------------
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def _score(self) -> float:
        """The validation Dice of the weights in the network now: rank 0's, on every process."""
        return self.par.from_main(lambda: validation_dice(self.model, self.samples, self.device))

    def tell(self, info: dict) -> None:
        """Report ``info`` to the callback; its ``False`` stops the run."""
        sizes = {"epochs": self.settings.epochs, "steps": self.settings.steps_per_epoch}
        told = {"stage": "train", **sizes, **info}
        if self.callback is not None and self.callback(told) is False:
            self.stop = "stopped"

    def validate(self, epoch: int, step: int, losses: list[float], report: bool = True) -> dict:
        """Score the weights (their average, with ``ema``) and keep them if best; returns the
        history record."""
        with self.ema.applied():  # the averaged weights are the ones scored and kept
            val = self._score()
            if _better(val, self.best):
                self.best = val
                self.best_state = copy.deepcopy(self.net.state_dict())
                self.result.best_epoch, self.result.best_step = epoch, self.step_no
                self.improved_epoch = epoch
        record = {"epoch": epoch, "step": self.step_no,
                  "loss": float(np.mean(losses)) if losses else None, "val_dice": val,
                  "seconds": self.seconds()}
        self.result.history.append(record)
        if report:
            self.tell({"epoch": epoch, "step": step, "loss": record["loss"], "val_dice": val,
                       "best_dice": self.best, "seconds": record["seconds"]})
        return record

    def step(self, net: torch.nn.Module, epoch: int, step: int) -> float:
        """Optimisation step ``step`` (from 0) of ``epoch`` through ``net``; returns its loss."""
        s, par = self.settings, self.par
        # the schedule sets this step's rate before the step (the first step warms up too)
        now = self.seconds()
        lr = learning_rate(s, (self.step_no + 1) / (s.epochs * s.steps_per_epoch),
                           par.agree_max(now) if s.max_seconds else now)
        for group in self.opt.param_groups:
            group["lr"] = lr
        # every process draws the global batch and keeps its rows
        x, t, m, w = par.shard(*self.batches(self.rng))
        x, t, m, w = x.to(self.device), t.to(self.device), m.to(self.device), w.to(self.device)
        with autocast(self.device):
            logits = net(x)
        loss = masked_loss(logits, t, m, w, self.model.num_classes, s.dice_weight,
                           reduce=par.loss_reduce)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)  # with fp16 scaling: skipped when the gradients overflowed
        self.scaler.update()
        self.step_no += 1
        self.ema.update(self.step_no)
        value = float(loss.detach())
        elapsed = self.seconds()
        self.tell({"epoch": epoch, "step": step + 1, "loss": value, "val_dice": None,
                   "best_dice": self.best, "seconds": elapsed, "lr": lr})
        over = s.max_seconds and elapsed > s.max_seconds
        self.stop = par.agree_stop(self.stop or ("time budget" if over else None))
        return value

    def epoch(self, net: torch.nn.Module, epoch: int, checkpoint: str | os.PathLike | None) -> None:
        """The steps and validations of ``epoch``, then the checkpoint; sets ``stop`` if the run
        ends here."""
        s, par = self.settings, self.par
        self.net.train()
        losses: list[float] = []
        since_val: list[float] = []
        for step in range(s.steps_per_epoch):
            losses.append(self.step(net, epoch, step))
            since_val.append(losses[-1])
            if self.stop:
                break
            if (step + 1) % self.val_every == 0 and step + 1 < s.steps_per_epoch:
                self.validate(epoch, step + 1, since_val)
                since_val = []
                self.net.train()
                self.stop = par.agree_stop(self.stop)
                if self.stop:
                    break
        # told after the checkpoint is written
        record = self.validate(epoch, s.steps_per_epoch, losses, report=False)
        record["epoch_end"] = True
        if checkpoint is not None and par.is_main:
            self.save(checkpoint, epoch)
        self.tell({"epoch": epoch, "step": s.steps_per_epoch, "loss": record["loss"],
                   "val_dice": record["val_dice"], "best_dice": self.best,
                   "seconds": record["seconds"], "epoch_end": True})
        self.stop = par.agree_stop(self.stop)
        # a time budget is the user's to spend: patience ends epoch-budgeted runs only
        if not self.stop and not s.max_seconds and epoch - self.improved_epoch >= s.patience:
            self.stop = "early stopping"

    # ---- the end ------------------------------------------------------------------------------
    def finish(self) -> dict:
        """The best weights into the model (CPU, eval mode), with their threshold; fills in the
        result; returns the ``training`` part of the model's provenance."""
        model, result, par, samples, device = (self.model, self.result, self.par, self.samples,
                                               self.device)
        par.unshard_dropout(self.dropouts)
        for d in self.dropouts:
            d.generator = None
        self.net.load_state_dict(self.best_state)
        if result.best_step == 0:  # the start model handed back works as it did
            model.normalization = self.start_normalization
        threshold_note = None
        # only trained weights get a threshold: a start model handed back keeps its own
        held_out = self.summary.get("split_kind") != "training"
        if self.settings.calibrate_threshold and result.best_step > 0 and held_out:
            found = par.from_main(lambda: calibrate_threshold(model, samples, device))
            if found is not None:
                th, at_half, at_th = found
                model.postprocess = {**model.postprocess, "threshold": th}
                threshold_note = {"threshold": th, "val_dice_at_0.5": round(at_half, 4),
                                  "val_dice_at_threshold": round(at_th, 4)}
        knockout = None
        if result.best_step > 0 and model.net.attention_keys():  # what each module changes
            from ..evaluation.knockout import knockout_on_samples

            self.net.eval()
            knockout = par.from_main(lambda: knockout_on_samples(model, samples, device))
        self.net.eval().to("cpu")
        result.stopped = self.stop or "epochs"
        result.best_dice = self.best
        result.improved = result.best_step > 0
        result.seconds = self.seconds()
        if not result.improved:
            self.warnings.append(
                f"no improvement over the start model: its validation Dice {_fmt(self.start_dice)} "
                "was never beaten, so the result is the start model unchanged (train longer, "
                "annotate more, or check the labels)")
        result.warnings = self.warnings
        return {"best_epoch": result.best_epoch, "best_step": result.best_step,
                "epochs_run": max((h["epoch"] for h in result.history), default=0),
                "steps_run": self.step_no, "stopped": result.stopped,
                "seconds": round(result.seconds, 1),
                "device": result.device, "head": self.head, "upsample": self.upsample_note,
                "improved": result.improved, "threshold": threshold_note, "knockout": knockout,
                **par.describe(), "warnings": self.warnings}


def _better(value: float, best: float) -> bool:
    return math.isfinite(value) and (not math.isfinite(best) or value > best)
