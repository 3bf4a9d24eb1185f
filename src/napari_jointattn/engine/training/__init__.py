"""Training and fine-tuning from (partial) annotations.

Modules: ``settings`` (TrainSettings, TrainResult), ``data`` (annotated
planes), ``split`` (the leak-free training/validation split), ``augment`` (crop
centres, MONAI augmentation), ``loss``, ``validation`` (held-out Dice,
threshold), ``schedule`` (learning rate), ``ema`` (weight average), ``start``
(start model, head decision), ``checkpoint`` (resume), ``loop`` (``train()``),
``distributed`` (data-parallel training under torchrun; see docs/scale.md);
``live`` (``LiveTrainer``, the learner of live mode), ``uncertainty`` (where to
annotate next), ``corrections`` (where the user changed the model's labels).

Names are imported on first use (PEP 562): ``training.split`` and
``training.settings`` load without the loop, MONAI or the augmentation.

Rules (documented in docs/training.md):

* Only annotated regions teach. A 2-D image or stack slice whose labels are
  all 0 is *unannotated* and ignored, unless an explicit ``masks`` entry marks
  annotated pixels; then only those pixels count.
* The validation split cannot leak: by image when there are several, by a
  block of slices (with a gap of ``GAP_SLICES`` unused slices) for one stack,
  otherwise by a strip of columns (with a ``GAP_PIXELS`` unused margin).
* Loss: cross-entropy (optionally weighted per pixel) + soft Dice, over
  annotated pixels only. AdamW. Best validation weights are kept; training
  stops at ``epochs``, ``max_seconds``, on early stopping, or when the
  callback returns ``False``.
"""

from ..._lazy import lazy_names

_API = {
    "CropBatches": "augment",
    "CropCentres": "augment",
    "Sample": "data",
    "annotation_summary": "data",
    "build_samples": "data",
    "train": "loop",
    "masked_loss": "loss",
    "TrainResult": "settings",
    "TrainSettings": "settings",
    "GAP_PIXELS": "split",
    "GAP_SLICES": "split",
    "split_samples": "split",
    "HEAD_RESET_DICE": "start",
    "start_model": "start",
    "MAX_VAL_PLANES": "validation",
    "THRESHOLDS": "validation",
    "calibrate_threshold": "validation",
    "classes_from_probs": "validation",
    "validation_dice": "validation",
}

__getattr__, __dir__ = lazy_names(__name__, _API, globals())

__all__ = list(_API)
