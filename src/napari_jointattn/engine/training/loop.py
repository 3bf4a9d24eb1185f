"""The training loop: ``train()``."""

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
from ..checks import check_axis, check_classes, check_output_file
from ..devices import autocast, describe_device, resolve_device
from ..models.model import Model, save_model
from .augment import CropBatches, CropCentres
from .checkpoint import _jsonable, _load_checkpoint, _save_checkpoint
from .data import build_samples
from .distributed import Parallel, training_device
from .ema import WeightAverage
from .loss import masked_loss
from .schedule import _set_lr, optimizer
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
    callback: Callable[[dict], "bool | None"] | None = None,
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
    settings = dataclasses.replace(settings) if settings is not None else TrainSettings()
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise TypeError(f"unknown training setting {key!r}")
        setattr(settings, key, value)
    settings.validate()
    if out is not None:
        out = check_output_file(out)
    classes = check_classes(classes)
    axis = check_axis(axis)
    device = training_device(resolve_device(settings.device))
    par = Parallel(device)
    par.check_batch(settings.batch_size)
    model, head_reset = _start_model(start, classes, seed=settings.seed)
    parent_name = _parent_name(start, model)
    samples, summary = build_samples(
        model, images, labels, masks, weights, axis, channel_axis, settings.val_fraction, settings.split
    )
    warnings_: list[str] = list(summary.get("warnings", []))

    # generators of this run's own: training runs in a worker thread inside napari,
    # and must neither reseed nor draw from the process's global random state
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    net = model.net.to(device)
    dropouts = [m for m in net.modules() if isinstance(m, Dropout2d)]
    for d in dropouts:
        d.generator = gen
    par.shard_dropout(dropouts, settings.batch_size)
    # the bar to beat, and what is handed back if nothing beats it: the start model as given
    # (before any head reset; with a new number of classes its head is new anyway)
    best_state = copy.deepcopy(net.state_dict())
    start_dice = par.from_main(lambda: validation_dice(model, samples, device))
    best = start_dice
    # the start model as given is the bar (above); trained weights work at this scale
    start_normalization = model.normalization
    upsample, upsample_note = _decide_upsample(model, samples, settings.upsample)
    model.normalization = model.normalization.replace(upsample=upsample)
    head = _decide_head(model, samples, settings.head, device, reset_already=head_reset,
                        seed=settings.seed)
    opt = optimizer(net, settings)
    total_steps = settings.epochs * settings.steps_per_epoch
    val_every = settings.val_every or max(1, settings.steps_per_epoch // 4)
    batches = CropBatches(samples, settings, CropCentres(samples, settings.crop_sampling), upsample)
    result = TrainResult(model=model, best_dice=best, start_dice=start_dice,
                         device=describe_device(device), summary=summary)
    result.history.append({"epoch": 0, "step": 0, "loss": None, "val_dice": best, "seconds": 0.0})
    t0 = time.perf_counter()
    stop = None
    first_epoch = 1
    step_no = 0  # optimisation steps so far
    improved_epoch = 0  # the last epoch whose validation beat the best so far
    fingerprint = json.dumps({"data": summary, "settings": _jsonable(vars(settings))}, sort_keys=True)
    with par.main_file(checkpoint) as resume_from:  # every process resumes from rank 0's checkpoint
        state = resume_from and _load_checkpoint(resume_from, net, opt, best_state, rng, gen, fingerprint)
    if state:
        best, result.best_epoch, result.best_step = state["best"], state["best_epoch"], state["best_step"]
        improved_epoch, step_no = state["improved_epoch"], state["step_no"]
        result.history = state["history"]
        first_epoch = state["epoch"] + 1
        t0 -= state["elapsed"]
    ema = WeightAverage(net, settings.ema, state["extra"] if state else None)
    ddp = par.wrap(net)  # the network the steps run through (``net`` itself with one process)

    def tell(info: dict) -> None:
        nonlocal stop
        if callback is not None and callback({"stage": "train", "epochs": settings.epochs,
                                              "steps": settings.steps_per_epoch, **info}) is False:
            stop = "stopped"

    def validate(epoch: int, step: int, losses: list[float], report: bool = True) -> dict:
        nonlocal best, best_state, improved_epoch
        with ema.applied():  # the averaged weights are the ones scored and kept
            val = par.from_main(lambda: validation_dice(model, samples, device))
            if _better(val, best):
                best = val
                best_state = copy.deepcopy(net.state_dict())
                result.best_epoch, result.best_step, improved_epoch = epoch, step_no, epoch
        record = {"epoch": epoch, "step": step_no, "loss": float(np.mean(losses)) if losses else None,
                  "val_dice": val, "seconds": time.perf_counter() - t0}
        result.history.append(record)
        if report:
            tell({"epoch": epoch, "step": step, "loss": record["loss"], "val_dice": val, "best_dice": best,
                  "seconds": record["seconds"]})
        return record

    if first_epoch == 1:  # the bar to beat, first in every progress report
        tell({"epoch": 0, "step": 0, "loss": None, "val_dice": start_dice, "best_dice": start_dice,
              "seconds": 0.0})
    for epoch in range(first_epoch, settings.epochs + 1):
        net.train()
        losses: list[float] = []
        since_val: list[float] = []
        for step in range(settings.steps_per_epoch):
            # the schedule sets this step's rate before the step (the first step warms up too)
            now = time.perf_counter() - t0
            _set_lr(opt, settings, (step_no + 1) / total_steps, par.agree_max(now) if settings.max_seconds else now)
            x, t, m, w = par.shard(*batches(rng))  # every process draws the global batch, keeps its rows
            x, t, m, w = x.to(device), t.to(device), m.to(device), w.to(device)
            with autocast(device):
                logits = ddp(x)
            loss = masked_loss(logits, t, m, w, model.num_classes, settings.dice_weight, reduce=par.loss_reduce)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_no += 1
            ema.update(step_no)
            losses.append(float(loss.detach()))
            since_val.append(losses[-1])
            elapsed = time.perf_counter() - t0
            tell({"epoch": epoch, "step": step + 1, "loss": losses[-1], "val_dice": None,
                  "best_dice": best, "seconds": elapsed, "lr": opt.param_groups[0]["lr"]})
            over = settings.max_seconds and elapsed > settings.max_seconds
            stop = par.agree_stop(stop or ("time budget" if over else None))
            if stop:
                break
            if (step + 1) % val_every == 0 and step + 1 < settings.steps_per_epoch:
                validate(epoch, step + 1, since_val)
                since_val = []
                net.train()
                stop = par.agree_stop(stop)
                if stop:
                    break
        record = validate(epoch, settings.steps_per_epoch, losses, report=False)  # told after the checkpoint
        record["epoch_end"] = True
        if checkpoint is not None and par.is_main:
            _save_checkpoint(checkpoint, net, opt, best_state, rng, gen, fingerprint, {
                "epoch": epoch, "best": best, "best_epoch": result.best_epoch, "best_step": result.best_step,
                "improved_epoch": improved_epoch, "step_no": step_no, "history": result.history,
                "elapsed": time.perf_counter() - t0}, extra=ema.tensors())
        tell({"epoch": epoch, "step": settings.steps_per_epoch, "loss": record["loss"],
              "val_dice": record["val_dice"], "best_dice": best, "seconds": record["seconds"],
              "epoch_end": True})
        stop = par.agree_stop(stop)
        if stop:
            break
        # a time budget is the user's to spend: patience ends epoch-budgeted runs only
        if not settings.max_seconds and epoch - improved_epoch >= settings.patience:
            stop = "early stopping"
            break
    del ddp
    par.unshard_dropout(dropouts)
    for d in dropouts:
        d.generator = None
    net.load_state_dict(best_state)
    if result.best_step == 0:  # the start model handed back works as it did
        model.normalization = start_normalization
    threshold_note = None
    # only trained weights get a threshold: a start model handed back keeps its own
    if settings.calibrate_threshold and result.best_step > 0 and summary.get("split_kind") != "training":
        found = par.from_main(lambda: calibrate_threshold(model, samples, device))
        if found is not None:
            th, at_half, at_th = found
            model.postprocess = {**model.postprocess, "threshold": th}
            threshold_note = {"threshold": th, "val_dice_at_0.5": round(at_half, 4),
                              "val_dice_at_threshold": round(at_th, 4)}
    knockout = None
    if result.best_step > 0 and model.net.attention_keys():  # what each attention module changes
        from ..evaluation.knockout import knockout_on_samples

        net.eval()
        knockout = par.from_main(lambda: knockout_on_samples(model, samples, device))
    net.eval().to("cpu")
    result.stopped = stop or "epochs"
    result.best_dice = best
    result.improved = result.best_step > 0
    result.seconds = time.perf_counter() - t0
    if not result.improved:
        warnings_.append(
            f"no improvement over the start model: its validation Dice {_fmt(start_dice)} was never beaten, "
            "so the result is the start model unchanged (train longer, annotate more, or check the labels)")
    result.warnings = warnings_
    model.name = name or model.name
    model.scores = {"val_dice": round(best, 6) if math.isfinite(best) else None,
                    "start_val_dice": round(start_dice, 6) if math.isfinite(start_dice) else None}
    from ..models.fit import data_statistics

    model.provenance = {
        "parent": parent_name,
        "data": summary,
        "data_statistics": data_statistics(images, channel_axis=channel_axis),
        "settings": _jsonable(vars(settings)),
        "training": {"best_epoch": result.best_epoch, "best_step": result.best_step,
                     "epochs_run": max((h["epoch"] for h in result.history), default=0),
                     "steps_run": step_no, "stopped": result.stopped, "seconds": round(result.seconds, 1),
                     "device": result.device, "head": head, "upsample": upsample_note, "improved": result.improved,
                     "threshold": threshold_note, "knockout": knockout, **par.describe(),
                     "warnings": warnings_},
        **(provenance or {}),
    }
    if out is not None and (result.improved or save_unchanged):  # written by rank 0, the others wait for it
        result.path = par.from_main(lambda: save_model(model, out))
    if checkpoint is not None and par.is_main and os.path.exists(checkpoint):
        os.remove(checkpoint)
    par.barrier()
    return result


def _better(value: float, best: float) -> bool:
    return math.isfinite(value) and (not math.isfinite(best) or value > best)
