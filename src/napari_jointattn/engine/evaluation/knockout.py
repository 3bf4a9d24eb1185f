"""How much each attention module matters: labels with it knocked out against with it on.

For every attention module, and for all of them at once, :func:`knockout`
segments the same pixels with the module passing its input through unchanged
(``DenseUNet.knocked_out``) and reports the fraction of pixels whose class
changes and the change of Dice against the reference. ``train()`` records it
on the validation pixels in the model file (``provenance.training.knockout``);
``evaluate(..., knockout=True)`` and ``napari-jointattn evaluate --knockout``
measure it on any labelled image.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..models.model import Model

#: the row of :func:`knockout` for every module knocked out at once
ALL = "all"


def _dice(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean Dice over the foreground classes present in ``truth`` (NaN when none is)."""
    present = [c for c in range(1, k) if (truth == c).any()]
    if not present:
        return float("nan")
    scores = []
    for c in present:
        p, t = pred == c, truth == c
        scores.append(2 * float((p & t).sum()) / float(p.sum() + t.sum()))
    return float(np.mean(scores))


def knockout_from(predict, model: Model, truth: np.ndarray | None, base: np.ndarray | None = None) -> dict:
    """The knock-out table from ``predict()`` -> classes of the pixels, called once per setting.

    ``base``: the classes with every module on, when already known. Returns
    ``{"dice": base Dice, "modules": {name: {"changed_fraction", "dice",
    "dice_change"}}}`` with ``ALL`` for every module at once; Dice entries
    are None without ``truth``.
    """
    names = [key.name for key, _ in model.net.attention_keys()]
    if not names:
        return {"dice": None, "modules": {}}
    k = model.num_classes
    base = predict() if base is None else base
    base_dice = _dice(base, truth, k) if truth is not None else float("nan")
    rows = {}
    for name in [*names, ALL]:
        with model.net.knocked_out(None if name == ALL else [name]):
            pred = predict()
        dice = _dice(pred, truth, k) if truth is not None else float("nan")
        rows[name] = {
            "changed_fraction": round(float(np.mean(pred != base)) if base.size else 0.0, 6),
            "dice": round(dice, 6) if np.isfinite(dice) else None,
            "dice_change": round(dice - base_dice, 6) if np.isfinite(dice) and np.isfinite(base_dice) else None,
        }
    return {"dice": round(base_dice, 6) if np.isfinite(base_dice) else None, "modules": rows}


#: planes :func:`knockout_on_samples` looks at, at most (evenly spaced): it runs once per module
MAX_PLANES = 8


def knockout_on_samples(model: Model, samples: Iterable, device: torch.device, side: str = "val") -> dict:
    """:func:`knockout_from` on the ``side`` pixels of training samples (what ``train()`` records)."""
    from ..training.validation import _held_out_predictions, classes_from_probs

    planes = [s for s in samples if getattr(s, f"{side}_mask").any()]
    if len(planes) > MAX_PLANES:
        planes = [planes[i] for i in np.linspace(0, len(planes) - 1, MAX_PLANES).round().astype(int)]
    if not planes:
        return knockout_from(lambda: np.zeros(0, np.int64), model, None)

    def run() -> tuple[np.ndarray, np.ndarray]:
        pairs = [(classes_from_probs(model, p), t) for p, t in _held_out_predictions(model, planes, device, side)]
        return np.concatenate([c for c, _ in pairs]), np.concatenate([t for _, t in pairs])

    base, truth = run()
    return knockout_from(lambda: run()[0], model, truth, base=base)


def describe_share(changed: float | None) -> str:
    """One line for a user: how much the labels of the pixels just segmented depend on attention."""
    if changed is None:
        return ""
    pct = 100 * changed
    amount = f"{pct:.2g} %" if pct >= 0.01 or pct == 0 else "under 0.01 %"
    if pct < 1:
        gist = "the labels barely use attention; its maps show where the modules look, not what decides"
    else:
        gist = "the labels depend on attention there"
    return f"attention off would change {amount} of these labels ({gist})"
