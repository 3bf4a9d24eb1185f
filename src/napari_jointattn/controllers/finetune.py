"""The Fine-tune dock's workflow, without Qt: pairs, annotation summary, training, versions, compare.

The controller takes plain values (layer names, a start-model key, settings)
and shares the current model and tile with the Segment dock through the
viewer's :class:`~.session.Session`, so a new model or a rollback is what the
next Segment uses whether or not the Segment dock is open. Model files are
read, models run and annotations counted only in the methods meant for a
worker thread (:meth:`FinetuneController.compute_summary`, :meth:`run`,
:meth:`compare`); the GUI-thread methods only snapshot layer data. The
functions :func:`summary_text`, :func:`progress_text`, :func:`result_text` and
:func:`curves` turn results into what the dock shows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.errors import BadInputError
from ..engine.models.versions import export_version, list_versions, version_path
from ..engine.training.corrections import correction_weights, label_changes
from .layers import current_index, is_attention_layer, layer_input
from .segment import PREDICTION_KEY
from .session import Session, preset_choices, session_for

CURRENT = "current Segment model"
NO_PAIR = ("no image/labels pair: choose an image and a Labels layer of its size and click Add pair "
           "(a Labels layer named '<image> labels' pairs by itself)")
#: the loss weight of a corrected pixel is 1 + this with "Weight my corrections"
CORRECTION_EXTRA = 4.0


def resolve_start(session: Session, key: str | None) -> str:
    """A start-model key: "current Segment model" (or none) is the session's current model:
    the Segment dock's model, else the first preset with bundled weights."""
    if key in (None, "", CURRENT):
        current = session.current_model()
        if not current:
            raise BadInputError("no model is installed: choose a start model file")
        return current
    return key


@dataclass
class TrainRequest:
    pairs: list[tuple[str, str]]
    images: list[np.ndarray]
    labels: list[np.ndarray]
    weights: list[np.ndarray | None] | None
    channel_axes: list[int | None]
    start: str
    settings: dict
    out: Path
    layer_ids: list = field(default_factory=list)


@dataclass
class SummaryInput:
    """What the annotation summary needs, snapshotted on the GUI thread."""

    start: str
    labels: list[np.ndarray]
    dims: list[int]
    error: str | None = None


@dataclass
class CompareRequest:
    image_name: str
    data: np.ndarray
    channel_axis: int | None
    slices: list[int] | None
    scale: tuple
    translate: tuple
    before: str
    after: str
    tile: int


def check_classes_annotated(request: TrainRequest) -> dict:
    """Refuse data that cannot teach the model anything (worker thread): no annotated pixel,
    or a single class annotated (e.g. every pixel painted as one object). Returns the summary."""
    from ..engine.models.metadata import read_metadata
    from ..engine.models.model import resolve_model
    from ..engine.training import annotation_summary

    classes = read_metadata(resolve_model(request.start))["classes"]
    dims = [lab.ndim for lab in request.labels]
    summary = annotation_summary(request.labels, len(classes), classes, dims)
    if summary["planes"] == 0:
        raise BadInputError(summary["warnings"][0] if summary["warnings"] else "no annotated pixels")
    present = [name for name, n in summary["pixels_per_class"].items() if n > 0]
    if len(present) < 2:
        raise BadInputError(f"only one class is annotated ({present[0]}): training needs at least two "
                            "(paint some background and some objects)")
    return summary


def summary_text(s: dict) -> str:
    """The annotation summary as the dock shows it."""
    per_class = ", ".join(f"{k}: {v:,}" for k, v in s["pixels_per_class"].items())
    text = f"Annotated: {s['images']} image(s), {s['planes']} image(s)/slice(s); pixels: {per_class}"
    if s["warnings"]:
        text += "\n⚠ " + "\n⚠ ".join(s["warnings"])
    return text


def progress_text(info: dict) -> str:
    """A training progress report (``train()``'s callback value) as one status line."""
    if info.get("val_dice") is not None:
        where = ("Start model" if info["epoch"] == 0
                 else f"Epoch {info['epoch']}, step {info['step']}/{info['steps']}")
        return f"{where}: validation Dice {info['val_dice']:.3f} (best {info['best_dice']:.3f})"
    best = info.get("best_dice")
    return (f"Epoch {info['epoch']}/{info.get('epochs', '?')}, "
            f"step {info['step']}/{info['steps']}: loss {info['loss']:.3f}, {info['seconds']:.0f} s"
            + (f" (best validation Dice {best:.3f})" if isinstance(best, float) else ""))


def result_text(result) -> str:
    """How a training run ended, for the status line: what was saved, or why nothing was."""
    if not result.improved:
        return (f"No improvement over the start model (validation Dice {result.start_dice:.3f} "
                f"was never beaten in {result.seconds:.0f} s): nothing saved. "
                "Train longer or annotate more. "
                f"Split {result.summary['split']}.")
    return (f"Saved {result.path.name}: best validation Dice {result.best_dice:.3f} (start model "
            f"{result.start_dice:.3f}; epoch {result.best_epoch}), stopped by {result.stopped}, "
            f"{result.seconds:.0f} s on {result.device}. The Segment dock now uses it. "
            f"Split {result.summary['split']}.")


def curves(history: list[dict]) -> tuple[tuple[list, list], tuple[list, list]]:
    """The plot's two curves from the progress reports: (epochs, training loss) of the steps and
    (epochs, validation Dice) of the checks; the start model's score sits at epoch 0."""
    def x(h):
        return max(0.0, (h["epoch"] - 1) + h["step"] / h["steps"])

    steps = [h for h in history if h.get("val_dice") is None]
    checks = [h for h in history if h.get("val_dice") is not None]
    return (([x(h) for h in steps], [h["loss"] for h in steps]),
            ([x(h) for h in checks], [h["val_dice"] for h in checks]))


class FinetuneController:
    """State and logic of the Fine-tune dock; usable without Qt (e.g. on a ``ViewerModel``)."""

    def __init__(self, viewer, session: Session | None = None) -> None:
        self.viewer = viewer
        self.session = session or session_for(viewer)
        self.running = False
        self.stop_event = threading.Event()
        self.history: list[dict] = []
        self.last_result = None
        self.last_request: TrainRequest | None = None

    # layers -------------------------------------------------------------
    def image_names(self) -> list[str]:
        from napari.layers import Image

        return [layer.name for layer in self.viewer.layers
                if isinstance(layer, Image) and not is_attention_layer(layer)]

    def labels_names(self, image_name: str | None = None) -> list[str]:
        """Labels layers; with ``image_name``, those of that image's size."""
        from napari.layers import Labels

        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)]
        if image_name is None or image_name not in self.viewer.layers:
            return names
        shape = layer_input(self.viewer.layers[image_name]).spatial_shape
        return [n for n in names if self.viewer.layers[n].data.shape == shape]

    def candidate_pairs(self) -> list[tuple[str, str]]:
        """(image, labels) pairs that pair by themselves: a Labels layer named ``<image> labels``."""
        images = set(self.image_names())
        return [(name.removesuffix(" labels"), name) for name in self.labels_names()
                if name.endswith(" labels") and name.removesuffix(" labels") in images]

    # start model ----------------------------------------------------------
    def start_choices(self) -> list[tuple[str, str]]:
        out = [(CURRENT, CURRENT)] + preset_choices()
        out += [(label, key) for label, key in self.session.model_choices() if (label, key) not in out]
        return out

    def resolve_start(self, key: str | None) -> str:
        return resolve_start(self.session, key)

    # summary ----------------------------------------------------------------
    def summary_input(self, pairs, start: str | None) -> SummaryInput:
        """Snapshot what the summary needs (GUI thread; no file is read)."""
        labels, dims, error = [], [], None
        try:
            start_key = self.resolve_start(start)
            for image_name, lab_name in pairs:
                inp, lab = self._pair_data(image_name, lab_name, None)
                labels.append(lab)
                dims.append(len(inp.spatial_shape))
        except BadInputError as exc:
            start_key, error = str(start), str(exc)
        return SummaryInput(start_key, labels, dims, error)

    @staticmethod
    def compute_summary(snap: SummaryInput) -> dict:
        """The annotation summary (worker thread: reads the start model's metadata only).

        Raises :class:`BadInputError` for a pair that cannot be used or an unreadable model.
        """
        from ..engine.models.metadata import read_metadata
        from ..engine.models.model import resolve_model
        from ..engine.training import annotation_summary

        if snap.error:
            raise BadInputError(snap.error)
        if not snap.labels:
            return {"images": 0, "planes": 0, "pixels_per_class": {}, "warnings": [NO_PAIR]}
        classes = read_metadata(resolve_model(snap.start))["classes"]
        return annotation_summary(snap.labels, len(classes), classes, snap.dims)

    def summary(self, pairs, start: str | None = None) -> dict:
        """Snapshot and compute in one call (scripts and tests)."""
        return self.compute_summary(self.summary_input(pairs, start))

    # training ----------------------------------------------------------------
    def _pair_data(self, image_name: str, labels_name_: str, channel_axis: int | None):
        layers = self.viewer.layers
        for name in (image_name, labels_name_):
            if name not in layers:
                raise BadInputError(f"layer {name!r} no longer exists")
        inp = layer_input(layers[image_name], channel_axis)
        lab = np.asarray(layers[labels_name_].data)
        if lab.shape != inp.spatial_shape:
            raise BadInputError(
                f"labels {labels_name_!r} have shape {lab.shape}, image {image_name!r} {inp.spatial_shape}"
            )
        return inp, lab

    def make_request(self, pairs, start: str | None, settings: dict, weight_corrections: float = 0.0,
                     channel_axes=None) -> TrainRequest:
        """Snapshot the pairs' data (GUI thread): training runs on copies of the labels."""
        if not pairs:
            raise BadInputError("no image/labels pair to train on: choose an image and a Labels layer "
                                "and click Add pair")
        start_key = self.resolve_start(start)
        images, labels, weights, axes, ids = [], [], [], [], []
        for i, (image_name, lab_name) in enumerate(pairs):
            ch = channel_axes[i] if channel_axes else None
            inp, lab = self._pair_data(image_name, lab_name, ch)
            images.append(inp.data)  # image data are not edited while training
            labels.append(lab.copy())  # labels are: train on a snapshot
            axes.append(inp.channel_axis)
            ids.append(self.viewer.layers[image_name].unique_id)
            pred = self.viewer.layers[lab_name].metadata.get(PREDICTION_KEY)
            weights.append(correction_weights(lab, pred, weight_corrections))
        out = version_path(start_key)
        return TrainRequest(list(pairs), images, labels, weights if any(w is not None for w in weights) else None,
                            axes, start_key, dict(settings), out, ids)

    def run(self, request: TrainRequest, progress=None):
        """Engine call (worker thread): the TrainResult, best weights saved to ``request.out``."""
        from ..engine.training import train

        self.stop_event.clear()
        self.history = []
        check_classes_annotated(request)

        def callback(info):
            if progress is not None:
                progress(info)
            return not self.stop_event.is_set()

        ch = request.channel_axes[0] if len(set(request.channel_axes)) == 1 else None
        return train(
            request.start, request.images, request.labels, weights=request.weights, channel_axis=ch,
            out=request.out, name=request.out.stem, callback=callback, save_unchanged=False,
            provenance={"layers": [{"image": i, "labels": l} for i, l in request.pairs],
                        "correction_weighting": request.weights is not None},
            **request.settings,
        )

    def finished(self, request: TrainRequest, result) -> list[str]:
        """Record a finished run (GUI thread); an improved model becomes the session's current
        model. Returns warnings for the user."""
        self.last_result, self.last_request = result, request
        notes = []
        for (image_name, _), uid in zip(request.pairs, request.layer_ids):
            if image_name not in self.viewer.layers or self.viewer.layers[image_name].unique_id != uid:
                notes.append(f"layer {image_name!r} was removed during training; "
                             "the model was trained on the data as it was when Train was clicked")
        notes += [w for w in result.warnings if not w.startswith("no improvement")]
        if result.improved and result.path is not None:
            self.session.set_model(str(result.path))
        return notes

    # versions --------------------------------------------------------------
    def versions(self) -> list[tuple[Path, dict]]:
        """Fine-tuned models in the model folder, newest first."""
        return list_versions()

    def use_version(self, path: str | Path) -> str:
        """Roll back (or forward): ``path`` becomes the model the next Segment uses."""
        path = Path(path)
        if not path.is_file():
            raise BadInputError(f"{path} no longer exists")
        self.session.set_model(str(path))
        return str(path)

    def export(self, path: Path, target: str, fmt: str | None = None) -> Path:
        """Export a version (worker thread for every format but a plain copy): see
        :func:`~..engine.versions.export_version`."""
        return export_version(path, target, fmt)

    # before / after ----------------------------------------------------------------
    def compare_request(self, image_name: str, before_key: str, after_key: str) -> CompareRequest:
        """Snapshot what Compare needs (GUI thread)."""
        if image_name not in self.viewer.layers:
            raise BadInputError(f"layer {image_name!r} no longer exists")
        layer = self.viewer.layers[image_name]
        inp = layer_input(layer)
        slices = [current_index(self.viewer, layer)] if len(inp.spatial_shape) == 3 else None
        return CompareRequest(image_name, inp.data, inp.channel_axis, slices, inp.scale, inp.translate,
                              before_key, after_key, self.session.tile)

    def compare(self, req: CompareRequest) -> np.ndarray:
        """Segment with both models (worker thread); the :func:`label_changes` map."""
        from ..engine.inference.segment import segment

        maps = [segment(req.data, self.session.model(key), tile=req.tile, slices=req.slices,
                        channel_axis=req.channel_axis).labels for key in (req.before, req.after)]
        return label_changes(*maps)
