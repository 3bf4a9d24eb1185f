"""Training and fine-tuning from (partial) annotations.

Modules: ``settings`` (TrainSettings, TrainResult), ``data`` (annotated
planes and their split), ``augment`` (crop centres, MONAI augmentation), ``loss``,
``validation`` (held-out Dice, threshold), ``schedule`` (learning rate),
``start`` (start model, head decision), ``checkpoint`` (resume), ``loop``
(``train()``), ``distributed`` (data-parallel training under torchrun; see
docs/scale.md).

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

from ..split import GAP_PIXELS, GAP_SLICES, split_samples
from .augment import CropBatches, CropCentres
from .data import Sample, annotation_summary, build_samples
from .loss import masked_loss
from .loop import train
from .settings import TrainResult, TrainSettings
from .start import HEAD_RESET_DICE, start_model
from .validation import MAX_VAL_PLANES, THRESHOLDS, calibrate_threshold, classes_from_probs, validation_dice

__all__ = [
    "GAP_PIXELS", "GAP_SLICES", "HEAD_RESET_DICE", "MAX_VAL_PLANES", "THRESHOLDS", "CropBatches", "CropCentres", "Sample",
    "TrainResult", "TrainSettings", "annotation_summary", "build_samples", "calibrate_threshold",
    "classes_from_probs", "masked_loss", "split_samples", "start_model", "train", "validation_dice",
]
