"""The model to fine-tune, and what happens to its classifier head."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import BadInputError
from ..models.model import Model, load_model, new_model
from .data import Sample
from .validation import validation_dice


def start_model(start: Model | str | os.PathLike | None, classes: Sequence[str] | None = None) -> Model:
    """The model to fine-tune: a copy of ``start`` (preset, file or Model).

    When ``classes`` differ in number from the start model's, every weight
    whose shape still fits is kept (the encoder and decoder) and the
    classifier head is re-initialised.
    """
    return _start_model(start, classes)[0]


def _start_model(start, classes, seed: int = 0) -> tuple[Model, bool]:
    """start_model(), and whether the head was re-initialised for a new number of classes."""
    head_reset = False
    if start is None:
        start = "nuclei"
    if isinstance(start, str) and not isinstance(start, os.PathLike):
        from ..models.presets import PRESETS

        try:
            base = load_model(start)
        except BadInputError:
            if start not in PRESETS:
                raise
            base = new_model(start)  # a preset without bundled weights: train from scratch
    else:
        base = load_model(start)
    model = copy.deepcopy(base)
    model.path = None
    if classes is not None and list(classes) != model.classes:
        classes = list(classes)
        if len(classes) != model.num_classes:
            cfg = model.config.to_dict()
            cfg["num_classes"] = len(classes)
            fresh = new_model(config=type(model.config).from_dict(cfg), classes=classes, name=model.name,
                              normalization=model.normalization,
                              postprocess={"instances": False} if len(classes) > 2 else model.postprocess)
            old = model.net.state_dict()
            new_state = fresh.net.state_dict()
            for key, value in new_state.items():
                if key in old and old[key].shape == value.shape:
                    new_state[key] = old[key]
            fresh.net.load_state_dict(new_state)
            _reset_head(fresh, seed)  # a seeded head, drawn from a generator of its own
            model = fresh
            head_reset = True
        model.classes = classes
    return model, head_reset


HEAD_RESET_DICE = 0.2


def _decide_head(model: Model, samples: list[Sample], mode: str, device, reset_already: bool = False,
                 seed: int = 0) -> str:
    """Keep or re-initialise the classifier head; returns what was done and why (for provenance).

    ``auto``: the head is re-initialised when the start model's Dice on the
    training annotations is below ``HEAD_RESET_DICE``: its classes then mean
    something else (nuclei -> a brain lesion), and a head that confidently
    predicts the old structure must first be unlearned. The encoder and
    decoder are kept either way.
    """
    if reset_already:
        return "re-initialised (the number of classes changed)"
    if mode == "keep" or not hasattr(model.net, "head_modules"):
        return "kept"
        return "kept (head='keep')"
    if mode == "reset":
        _reset_head(model, seed)
        return "re-initialised (head='reset')"
    dice = validation_dice(model, samples, device, side="train")
    if math.isfinite(dice) and dice >= HEAD_RESET_DICE:
        return f"kept: the start model's Dice on the training annotations is {dice:.3f}"
    _reset_head(model, seed)
    return (f"re-initialised: the start model's Dice on the training annotations is {_fmt(dice)}, "
            f"below {HEAD_RESET_DICE}")


def _reset_head(model: Model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for module in model.net.head_modules():
        for p in module.parameters(recurse=False):
            fresh = torch.zeros(p.shape)  # on the CPU, where the generator is
            if p.ndim > 1:
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
            with torch.no_grad():
                p.copy_(fresh)


def _parent_name(start, model: Model) -> str:
    """How provenance names the start model: a file's stem, or a preset's name."""
    from ..models.presets import PRESETS

    if isinstance(start, str) and start in PRESETS:
        from ..models.metadata import PRESET_DIR

        if not (PRESET_DIR / f"{start}.safetensors").is_file():
            return f"none (freshly initialised {start} architecture)"
    if isinstance(start, Model):
        return start.path.stem if start.path is not None else start.name
    if start is not None and (str(start).endswith(".safetensors") or os.path.isfile(start)):
        return os.path.basename(os.fspath(start)).removesuffix(".safetensors")
    return str(start) if start is not None else model.name


#: annotated structures thinner than this (pixels) are learnt and segmented at 2x
THIN_PIXELS = 6.0


def structure_width(samples: list[Sample]) -> float:
    """Typical width (pixels) of the annotated foreground on the training side.

    From the mean distance to the background over foreground pixels: a band
    ``w`` pixels wide has a mean of about ``(w + 2) / 4``. NaN without foreground.
    """
    from scipy import ndimage as ndi

    depths = []
    for s in samples:
        fg = (s.target > 0) & s.train_mask
        if fg.any():
            depths.append(ndi.distance_transform_edt(s.target > 0)[fg])
    return float(4 * np.concatenate(depths).mean() - 2) if depths else float("nan")


def _decide_upsample(model: Model, samples: list[Sample], setting) -> tuple[int, str]:
    """How many times larger the network sees the image; and why (for provenance).

    ``auto``: 2 when the annotated structures are thinner than ``THIN_PIXELS``
    (a border misplaced by one pixel then costs a third of their area; at 2x
    the network places it to half a pixel), else the start model's own.
    """
    own = model.normalization.upsample
    if setting != "auto":
        return int(setting), f"{setting} (upsample={setting})"
    width = structure_width(samples)
    if math.isfinite(width) and width < THIN_PIXELS and own < 2:
        return 2, f"2: the annotated structures are about {width:.1f} px wide, below {THIN_PIXELS:g}"
    return own, f"{own}: the start model's (annotated structures about {_fmt(width)} px wide)"


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"
