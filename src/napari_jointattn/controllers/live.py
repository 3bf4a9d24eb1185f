"""Live mode of the Fine-tune dock ("Learn while I paint"), without Qt.

:class:`LiveController` keeps one :class:`~..engine.live.LiveTrainer` for
one image/labels pair. The GUI thread only records what the user painted
(:meth:`LiveController.record_paint`, :meth:`LiveController.record_erase`) and
hands a copy of the annotations over (:meth:`LiveController.submit`); the
worker thread runs :meth:`LiveController.run`: bursts of training, a
prediction of the slice in view every ``refresh`` seconds (classes and their
uncertainty), the *Next* target when asked for, and at the end the scores and,
if the live weights beat the start model, a new model version.

What counts as annotated (:data:`PAINTED`, the default): the pixels painted,
erased or filled on the labels layer since live mode started; a label > 0 is
that class, 0 is background. napari 0.9.2 records (and emits
``events.paint`` for) only pixels whose value changes, so erasing over pixels
that are already 0 emits nothing: the dock therefore also records the
footprint of every *erase* stroke itself (the mouse callback
:meth:`LiveController.erase_capture` gives it), so erasing anywhere marks
background. :data:`WHOLE_SLICES`: every slice painted on counts as a whole
(0 = background), the painted pixels weighted higher, as *Weight my
corrections* does. The user's labels layer is only read, never written.

What the dock shows of the worker's reports is decided here too
(:meth:`LiveController.show_prediction`, :meth:`LiveController.go_to`): the
dock only runs these methods on the GUI thread, when they ask to be run.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.errors import BadInputError
from .finetune import CORRECTION_EXTRA, NO_PAIR, resolve_start
from .layers import current_index, layer_input
from .session import Session, session_for

PAINTED = "painted pixels only"
WHOLE_SLICES = "whole slices I painted on"
ANNOTATED_CHOICES = (PAINTED, WHOLE_SLICES)
#: seconds of training per burst (the loop looks at new annotations between bursts)
BURST_S = 1.5
#: seconds between two predictions of the slice in view (while the weights change)
REFRESH_S = 3.0
#: side of the square window *Next* points at
NEXT_WINDOW = 64
#: unannotated slices of a stack sampled for *Next*, besides the slice in view
NEXT_SAMPLES = 3
NO_IMPROVEMENT = "no improvement over the start model"
#: what *Next* ranks windows by: the softmax entropy (the default: shown anyway as the uncertainty
#: layer), or the disagreement of the joint modules' point-wise and self-attention branches (models
#: with joint modules; two more forward passes per plane). docs/results.md compares them with a
#: simulated annotator: neither was consistently ahead of the other
ENTROPY = "entropy"
DISAGREEMENT = "branch disagreement"
GUIDES = (ENTROPY, DISAGREEMENT)


def prediction_name(image_name: str) -> str:
    return f"{image_name} live prediction"


def uncertainty_name(image_name: str) -> str:
    return f"{image_name} uncertainty"


@dataclass
class Snapshot:
    """A copy of the annotated part of the annotations, taken on the GUI thread, for the trainer.

    For a stack, ``labels``, ``mask`` and ``weights`` hold only the slices
    listed in ``planes`` (the slices painted on), in that order; for a 2-D
    image ``planes`` is None and they are whole. :meth:`full` gives arrays of
    the image's shape.
    """

    labels: np.ndarray
    mask: np.ndarray
    weights: np.ndarray | None
    painted_pixels: int
    planes: tuple[int, ...] | None = None
    shape: tuple = ()

    def full(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Labels, mask and weights of the image's shape (worker thread). The slices not
        painted on are unannotated: mask False, labels and weights 0 (the weights of
        unannotated pixels weigh nothing). For a stack, only the painted slices are written
        into zero-filled volumes, so the pages of the others are never touched here."""
        if self.planes is None:
            return self.labels, self.mask, self.weights
        labels = np.zeros(self.shape, self.labels.dtype)
        mask = np.zeros(self.shape, bool)
        weights = None if self.weights is None else np.zeros(self.shape, np.float32)
        for i, z in enumerate(self.planes):
            labels[z] = self.labels[i]
            mask[z] = self.mask[i]
            if weights is not None:
                weights[z] = self.weights[i]
        return labels, mask, weights


@dataclass
class LivePrediction:
    """The live model's view of one plane: ``z`` (None for a 2-D image), classes and uncertainty."""

    z: int | None
    classes: np.ndarray
    uncertainty: np.ndarray
    total_steps: int


@dataclass
class Target:
    """Where *Next* sends the view: slice ``z`` (None for a 2-D image), centre ``y, x`` (data pixels)."""

    z: int | None
    y: int
    x: int
    score: float
    box: tuple[int, int, int, int]
    #: what ranked it (:data:`GUIDES`)
    guide: str = ENTROPY


@dataclass
class LiveOutcome:
    """How live mode ended: the scores and, when improved, the saved version."""

    scores: dict
    steps: int
    snapshots: int
    path: Path | None = None
    warning: str | None = None


@dataclass
class NewLayer:
    """A live layer to add: ``kind`` "image" or "labels", its name, data and napari options."""

    kind: str
    name: str
    data: np.ndarray
    options: dict


@dataclass
class _Pair:
    image_name: str
    labels_name: str
    image: np.ndarray  # channels last
    channel_axis: int | None
    shape: tuple
    scale: tuple
    translate: tuple
    layer_ids: tuple = field(default_factory=tuple)

    @property
    def stack(self) -> bool:
        return len(self.shape) == 3


def _bounding_box(index: tuple, shape: tuple) -> tuple[slice, ...]:
    """The slices around the integer-array ``index`` into an array of ``shape`` (the whole
    array for any other kind of index)."""
    arrays = [np.asarray(i) for i in index]
    if len(arrays) != len(shape) or any(a.dtype.kind not in "iu" or not a.size for a in arrays):
        return tuple(slice(None) for _ in shape)
    return tuple(slice(int(a.min()), int(a.max()) + 1) for a in arrays)


class LiveController:
    """State and logic of *Learn while I paint*; usable without Qt (e.g. on a ``ViewerModel``)."""

    def __init__(self, viewer, session: Session | None = None, refresh: float = REFRESH_S,
                 burst: float = BURST_S) -> None:
        self.viewer = viewer
        self.session = session or session_for(viewer)
        self.refresh = refresh
        self.burst = burst
        self.pair: _Pair | None = None
        self.start_key: str | None = None
        self.annotated = PAINTED
        self.guide = ENTROPY
        self.settings: dict = {}
        self.trainer = None
        self.painted: np.ndarray | None = None  # True where the user painted since start
        self._touched = np.zeros(0, bool)  # per slice (one for a 2-D image): painted on since start
        self.view_slice = 0  # set by the GUI thread when the view moves
        self.strokes = 0
        self.submitted = 0
        self.stop_event = threading.Event()
        self._next_wanted = threading.Event()
        self._lock = threading.Lock()  # guards _pending and _uncertainty
        self._pending: Snapshot | None = None
        self._uncertainty: dict[int, np.ndarray] = {}
        self._visited: list[tuple] = []
        self._value_range = None
        #: the prediction shown last (:meth:`show_prediction`)
        self.latest: LivePrediction | None = None

    # start (GUI thread) ---------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.pair is not None

    def start(self, image_name: str | None, labels_name: str | None, start: str | None = None,
              annotated: str = PAINTED, channel_axis: int | None = None, guide: str = ENTROPY,
              **settings) -> None:
        """Check the pair and the choices and get ready (GUI thread; no model is loaded here).

        Raises :class:`BadInputError` for no pair, a missing layer, shapes that differ,
        an image that is not 2-D or a stack of 2-D planes, or an unknown choice.
        """
        from napari.layers import Image, Labels

        if not image_name or not labels_name:
            raise BadInputError(NO_PAIR)
        if annotated not in ANNOTATED_CHOICES:
            raise BadInputError(f"what counts as annotated must be one of {ANNOTATED_CHOICES}")
        if guide not in GUIDES:
            raise BadInputError(f"Next ranks regions by one of {GUIDES}, not {guide!r}")
        layers = self.viewer.layers
        for name, kind in ((image_name, Image), (labels_name, Labels)):
            if name not in layers:
                raise BadInputError(f"layer {name!r} no longer exists")
            if not isinstance(layers[name], kind):
                raise BadInputError(f"layer {name!r} is not a{'n Image' if kind is Image else ' Labels'} layer")
        inp = layer_input(layers[image_name], channel_axis)
        lab = layers[labels_name].data
        if tuple(lab.shape) != tuple(inp.spatial_shape):
            raise BadInputError(f"labels {labels_name!r} have shape {tuple(lab.shape)}, "
                                f"image {image_name!r} {tuple(inp.spatial_shape)}: they must match")
        if len(inp.spatial_shape) not in (2, 3):
            raise BadInputError(f"live mode takes a 2-D image or a stack of 2-D planes, not shape "
                                f"{tuple(inp.spatial_shape)}")
        data = inp.data if inp.channel_axis is None else np.moveaxis(inp.data, inp.channel_axis, -1)
        self.start_key = resolve_start(self.session, start)
        self.pair = _Pair(image_name, labels_name, data, None if inp.channel_axis is None else data.ndim - 1,
                          tuple(inp.spatial_shape), inp.scale, inp.translate,
                          (layers[image_name].unique_id, layers[labels_name].unique_id))
        self.annotated = annotated
        self.guide = guide
        self.settings = dict(settings)
        self.painted = np.zeros(self.pair.shape, bool)
        self._touched = np.zeros(self.pair.shape[0] if self.pair.stack else 1, bool)
        self.trainer = None
        self.strokes = self.submitted = 0
        self.stop_event.clear()
        self._next_wanted.clear()
        self._pending = None
        self._uncertainty = {}
        self._visited = []
        self._value_range = None
        self.latest = None

    def follow_view(self, event=None) -> None:
        """Predict the slice in view from now on (GUI thread; connect it to the viewer's
        ``dims.events.current_step``)."""
        pair = self.pair
        if pair is None or not pair.stack or pair.image_name not in self.viewer.layers:
            return
        self.view_slice = current_index(self.viewer, self.viewer.layers[pair.image_name])

    def go_to(self, target: Target | None) -> None:
        """Centre the view on ``target`` and show its slice (GUI thread)."""
        pair = self.pair
        if target is None or pair is None or pair.image_name not in self.viewer.layers:
            return
        layer = self.viewer.layers[pair.image_name]
        point = (target.y, target.x) if target.z is None else (target.z, target.y, target.x)
        world = layer.data_to_world(point)
        if target.z is not None:
            self.viewer.dims.set_point(self.viewer.dims.ndim - 3, float(world[0]))
        self.viewer.camera.center = tuple(float(v) for v in world[-2:])

    def pair_present(self) -> bool:
        """Whether both layers of the pair are still in the viewer (the same layers)."""
        if self.pair is None:
            return False
        layers = self.viewer.layers
        names = (self.pair.image_name, self.pair.labels_name)
        return all(n in layers for n in names) and \
            (layers[names[0]].unique_id, layers[names[1]].unique_id) == self.pair.layer_ids

    # what the user painted (GUI thread) ----------------------------------------------------------
    def record_paint(self, atoms) -> int:
        """Mark the pixels of a labels layer's ``events.paint`` value as painted; how many were new.

        The work is proportional to the edit: only each atom's bounding box is
        read, never the whole volume.
        """
        if self.painted is None:
            return 0
        added = 0
        for atom in atoms or ():
            if hasattr(atom, "slice_key"):  # mask-based edit: paint, fill, polygon
                key = tuple(atom.slice_key)
                region = self.painted[key]
                before = np.count_nonzero(region)
                if atom.mask is None:
                    region[...] = True
                else:
                    region[np.asarray(atom.mask, bool).reshape(region.shape)] = True
            else:  # (indices, old values, new values) from data_setitem
                index = tuple(atom[0])
                key = _bounding_box(index, self.painted.shape)
                region = self.painted[key]
                before = np.count_nonzero(region)
                self.painted[index] = True
            added += np.count_nonzero(region) - before
            self._touched[key[0] if self.pair.stack else 0] = True
        self.strokes += 1
        return int(added)

    def record_erase(self, points, brush_size: float) -> int:
        """Mark the footprint of an erase stroke as painted (background); how many pixels were new.

        ``points``: the stroke's positions in data coordinates (the last two
        are rows and columns; for a stack the first is the slice, the first
        point's for the whole stroke, as a drag stays on the slice in view).
        The brush is a disk of ``brush_size`` pixels across, as napari paints
        it, at every pixel of the straight lines joining the positions.
        """
        from skimage.draw import disk, line

        if self.painted is None or not len(points):
            return 0
        pts = np.rint(np.asarray(points, float)).astype(np.int64)
        if self.pair.stack:
            z = int(pts[0, 0])
            if not 0 <= z < self.pair.shape[0]:
                return 0
            plane = self.painted[z]
        else:
            z, plane = 0, self.painted
        ends = pts[:, -2:]
        rows, cols = [ends[:1, 0]], [ends[:1, 1]]
        for (r0, c0), (r1, c1) in itertools.pairwise(ends):
            rr, cc = line(r0, c0, r1, c1)
            rows.append(rr[1:])
            cols.append(cc[1:])
        dr, dc = disk((0, 0), math.floor(brush_size / 2) + 0.5)
        rr = (np.concatenate(rows)[:, None] + dr).ravel()
        cc = (np.concatenate(cols)[:, None] + dc).ravel()
        inside = (rr >= 0) & (rr < plane.shape[0]) & (cc >= 0) & (cc < plane.shape[1])
        rr, cc = rr[inside], cc[inside]
        self.strokes += 1
        if not rr.size:
            return 0
        region = plane[rr.min(): rr.max() + 1, cc.min(): cc.max() + 1]
        before = np.count_nonzero(region)
        plane[rr, cc] = True
        self._touched[z] = True
        return int(np.count_nonzero(region) - before)

    def erasing(self, layer, event) -> bool:
        """Whether a mouse drag on ``layer`` erases, in a 2-D view of its last two axes, while
        live mode runs."""
        erasing = layer.mode == "erase" or (layer.mode == "paint" and
                                            layer.selected_label == layer.colormap.background_value)
        displayed = tuple(getattr(event, "dims_displayed", ()) or ())
        return self.active and erasing and displayed == (layer.ndim - 2, layer.ndim - 1)

    def erase_capture(self, recorded: Callable[[], None]) -> Callable:
        """A mouse-drag callback for the labels layer that records erase strokes with
        :meth:`record_erase` (also over unlabelled pixels, which napari does not report)
        and calls ``recorded()`` after a stroke that marked new pixels."""
        def capture(layer, event):
            if not self.erasing(layer, event):
                return
            points = [layer.world_to_data(event.position)]
            yield
            while event.type == "mouse_move":
                points.append(layer.world_to_data(event.position))
                yield
            if self.active and self.record_erase(points, layer.brush_size):
                recorded()

        return capture

    def data_replaced(self) -> str | None:
        """After the labels layer's data were replaced (undo, redo, a script): why live mode
        must stop (data of another shape), or None when the labels just need handing over again."""
        if self.pair is None or self.pair.labels_name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[self.pair.labels_name]
        if tuple(layer.data.shape) != self.pair.shape:
            return f"The data of {layer.name!r} were replaced by data of another shape."
        return None

    def snapshot(self) -> Snapshot | None:
        """A copy of the annotations as the chosen rule counts them (GUI thread).

        For a stack only the slices painted on are copied, so the cost grows with
        what was annotated, not with the volume. None when nothing has been
        painted since live mode started.
        """
        if self.pair is None or not self._touched.any():
            return None
        if self.pair.labels_name not in self.viewer.layers:
            raise BadInputError(f"layer {self.pair.labels_name!r} no longer exists")
        data = self.viewer.layers[self.pair.labels_name].data
        if tuple(data.shape) != self.pair.shape:
            raise BadInputError(f"labels {self.pair.labels_name!r} now have shape "
                                f"{tuple(data.shape)}, the image {self.pair.shape}")
        if self.pair.stack:
            planes = tuple(int(z) for z in np.flatnonzero(self._touched))
            labels = np.stack([np.asarray(data[z]) for z in planes])
            painted = self.painted[list(planes)]
        else:
            planes = None
            labels = np.array(data, copy=True)
            painted = self.painted.copy()
        count = int(np.count_nonzero(painted))
        if not count:
            return None
        mask = self.annotated_mask(painted)
        weights = None if self.annotated == PAINTED else \
            np.where(painted, 1.0 + CORRECTION_EXTRA, 1.0).astype(np.float32)
        return Snapshot(labels, mask, weights, count, planes, self.pair.shape)

    def annotated_mask(self, painted: np.ndarray | None = None) -> np.ndarray:
        """True where the chosen rule counts a pixel as annotated: the painted pixels, or the
        whole slices painted on. ``painted``: the painted mask (default: all of it), or for a
        stack the painted mask of some of its slices."""
        painted = self.painted if painted is None else painted
        if self.annotated == PAINTED or not painted.any():
            return painted.copy()
        if not self.pair.stack:
            return np.ones_like(painted)
        mask = np.zeros_like(painted)
        mask[painted.reshape(painted.shape[0], -1).any(1)] = True
        return mask

    def submit(self) -> Snapshot | None:
        """Snapshot the annotations and hand them to the trainer (GUI thread); the snapshot."""
        snap = self.snapshot()
        if snap is None:
            return None
        with self._lock:
            self._pending = snap
        self.submitted += 1
        return snap

    def request_next(self) -> None:
        """Ask the worker for the *Next* target (the next loop iteration answers)."""
        self._next_wanted.set()

    def stop(self) -> None:
        self.stop_event.set()

    # worker thread --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load the start model into a :class:`LiveTrainer` (worker thread)."""
        from ..engine.training.live import LiveTrainer

        if self.pair is None:
            raise BadInputError("live mode was not started")
        model = self.session.model(self.start_key)
        self.trainer = LiveTrainer(model, channel_axis=self.pair.channel_axis, axis=0 if self.pair.stack else None,
                                   **self.settings)
        if self.pair.stack:
            from ..engine.io.channels import prepare_channels

            data = prepare_channels(self.pair.image, model.in_channels, self.pair.channel_axis)
            self._value_range = self.trainer.model.normalization.volume_range(data)

    def _hand_over(self) -> None:
        with self._lock:
            snap, self._pending = self._pending, None
        if snap is not None:
            labels, mask, weights = snap.full()
            self.trainer.submit([self.pair.image], [labels], masks=[mask],
                                weights=None if weights is None else [weights])

    def _plane(self, z: int | None) -> np.ndarray:
        return self.pair.image if z is None else self.pair.image[z]

    def predict(self, z: int | None = None) -> LivePrediction:
        """Classes and uncertainty of plane ``z`` (None for a 2-D image) with the weights of the moment."""
        from ..engine.inference.postprocess import classify
        from ..engine.training.uncertainty import entropy

        probs = self.trainer.probabilities(self._plane(z), self._value_range)
        classes = classify(probs, self.trainer.model.postprocess)
        u = entropy(probs)
        with self._lock:
            self._uncertainty[-1 if z is None else z] = u
        return LivePrediction(z, classes, u, self.trainer.steps)

    def _current_z(self) -> int | None:
        if not self.pair.stack:
            return None
        return int(min(max(self.view_slice, 0), self.pair.shape[0] - 1))

    def next_target(self, rng: np.random.Generator | None = None) -> Target | None:
        """The most uncertain window not annotated yet and not pointed at before (worker thread).

        2-D: the latest uncertainty map. Stack: the slice in view and up to
        :data:`NEXT_SAMPLES` sampled slices with no annotation (predicted here).
        None when every window is annotated or visited.
        """
        from ..engine.training.uncertainty import rank_regions

        rng = rng or np.random.default_rng(len(self._visited))
        painted = self.annotated_mask()
        guide = self.guide_used()
        if not self.pair.stack:
            zs = [None]
            annotated = painted[None]
        else:
            z0 = self._current_z()
            free = [z for z in range(self.pair.shape[0]) if z != z0 and not painted[z].any()]
            picks = sorted(rng.choice(free, size=min(NEXT_SAMPLES, len(free)), replace=False).tolist()) if free else []
            zs = [z0, *picks]
            annotated = painted[zs]
        planes = np.stack([self._guide_map(z, guide) for z in zs])
        annotated = annotated.copy()
        for vz, y0, x0, y1, x1 in self._visited:
            if vz in zs:
                annotated[zs.index(vz), y0:y1, x0:x1] = True
        regions = rank_regions(planes, annotated, window=self.window(), count=1)
        if not regions:
            return None
        reg = regions[0]
        z = zs[reg.z]
        self._visited.append((z, reg.y0, reg.x0, reg.y1, reg.x1))
        _, cy, cx = reg.centre
        return Target(z, cy, cx, reg.score, (reg.y0, reg.x0, reg.y1, reg.x1), guide)

    def guide_used(self) -> str:
        """The chosen guide, or entropy for a model without joint modules (no two branches)."""
        if self.guide == DISAGREEMENT and not self.trainer.net.joint_modules():
            return ENTROPY
        return self.guide

    def _guide_map(self, z: int | None, guide: str) -> np.ndarray:
        """Plane ``z``'s map for *Next*: the branches' disagreement, or the (latest) entropy."""
        if guide == DISAGREEMENT:
            return self.trainer.disagreement(self._plane(z), self._value_range)
        key = -1 if z is None else z
        with self._lock:
            u = self._uncertainty.get(key)
        if u is None or (z is not None and z != self._current_z()):
            u = self.predict(z).uncertainty
        return u

    def window(self) -> int:
        """The side of *Next*'s window: :data:`NEXT_WINDOW`, smaller on small images (a quarter of the side)."""
        return int(min(NEXT_WINDOW, max(8, min(self.pair.shape[-2:]) // 4)))

    def run(self, should_stop: Callable[[], bool] | None = None) -> Iterator[dict]:
        """The live loop (worker thread): yields a report after each burst, returns a :class:`LiveOutcome`.

        A report has ``steps``, ``loss``, ``total_steps``, ``snapshots``,
        ``waiting``, and ``prediction`` (a :class:`LivePrediction`) when the
        slice in view was predicted, ``next`` (a :class:`Target` or None) when
        *Next* was asked for. The first report always carries the start
        model's prediction, so the user sees where it is wrong.
        """
        def stopping() -> bool:
            return self.stop_event.is_set() or (should_stop is not None and should_stop())

        if self.trainer is None:
            self.prepare()
        last_pred, pred_steps, pred_z = -math.inf, -1, object()
        while not stopping():
            self._hand_over()
            out = self.trainer.train(seconds=self.burst,
                                     should_stop=lambda: stopping() or self._next_wanted.is_set())
            report = {"steps": out["steps"], "loss": out["loss"], "total_steps": out["total_steps"],
                      "snapshots": self.trainer.snapshots, "waiting": out["waiting"]}
            z = self._current_z()
            now = time.monotonic()
            if z != pred_z or (self.trainer.steps != pred_steps and now - last_pred >= self.refresh):
                report["prediction"] = self.predict(z)
                last_pred, pred_steps, pred_z = time.monotonic(), self.trainer.steps, z
            if self._next_wanted.is_set():
                self._next_wanted.clear()
                report["next"] = self.next_target()
            yield report
            if out["steps"] == 0:  # nothing to learn yet: wait for strokes without spinning
                end = time.monotonic() + 0.3
                while time.monotonic() < end and not (stopping() or self._next_wanted.is_set()
                                                      or self._pending is not None):
                    time.sleep(0.02)
        return self.finish()

    def finish(self) -> LiveOutcome:
        """Score the live weights against the start model; save a version if they are better
        (worker thread). Nothing is saved otherwise."""
        from ..engine.models.fit import data_statistics
        from ..engine.models.model import save_model
        from ..engine.models.versions import version_path

        self._hand_over()
        scores = self.trainer.scores()
        outcome = LiveOutcome(scores, self.trainer.steps, self.trainer.snapshots)
        if not scores["improved"]:
            start, live = scores["start"], scores["live"]
            detail = ("nothing was annotated" if not math.isfinite(live)
                      else f"Dice on the painted pixels {live:.3f}, start model {start:.3f}")
            outcome.warning = f"Live mode: {NO_IMPROVEMENT} ({detail}); nothing was saved"
            return outcome
        out = version_path(self.start_key)
        model = self.trainer.result(name=out.stem)
        model.scores = {"val_dice": None, "live_dice": round(scores["live"], 6),
                        "start_live_dice": round(scores["start"], 6)}
        model.provenance["training"]["improved"] = True
        model.provenance["data"] = model.provenance["training"].get("annotations", {})
        model.provenance["data_statistics"] = data_statistics(
            [self.pair.image], channel_axis=self.pair.channel_axis)
        model.provenance["layers"] = [{"image": self.pair.image_name, "labels": self.pair.labels_name}]
        model.provenance["live_annotated"] = self.annotated
        outcome.path = save_model(model, out)
        return outcome

    # the worker's reports (GUI thread) ---------------------------------------------------------
    def missing_layer(self, pred: LivePrediction) -> NewLayer | None:
        """The next live layer to add, already showing ``pred``: the uncertainty first (below
        the prediction, so the classes stay readable), then the prediction; None when both exist."""
        pair = self.pair
        names = (prediction_name(pair.image_name), uncertainty_name(pair.image_name))
        geometry = {"scale": pair.scale, "translate": pair.translate}

        def filled(values, dtype):  # a new layer shows the prediction from its first frame
            data = np.zeros(pair.shape, dtype)
            plane = data if pred.z is None else data[pred.z]
            if plane.shape == values.shape:
                plane[...] = values
            return data

        if names[1] not in self.viewer.layers:
            return NewLayer("image", names[1], filled(pred.uncertainty, np.float32),
                            {"colormap": "magma", "blending": "additive", "opacity": 0.5,
                             "contrast_limits": (0.0, 1.0), **geometry})
        if names[0] not in self.viewer.layers:
            return NewLayer("labels", names[0], filled(pred.classes, np.uint8), {"opacity": 0.45, **geometry})
        return None

    def show_prediction(self, pred: LivePrediction) -> bool:
        """Show ``pred`` (it becomes :attr:`latest`) in the live layers.

        A missing layer is added alone and True is returned: call again with
        :attr:`latest` on a later turn of the event loop (adding a 512² layer
        takes napari about 0.1 s; two at once made the loop's worst pause).
        Otherwise the plane is written into both layers in place and False is
        returned. Nothing happens (False) once live mode has ended.
        """
        self.latest = pred
        if self.pair is None or pred is None:
            return False
        new = self.missing_layer(pred)
        if new is not None:
            add = self.viewer.add_image if new.kind == "image" else self.viewer.add_labels
            add(new.data, name=new.name, **new.options)
            return True
        names = (prediction_name(self.pair.image_name), uncertainty_name(self.pair.image_name))
        for name, values in zip(names, (pred.classes, pred.uncertainty)):
            layer = self.viewer.layers[name]
            if tuple(layer.data.shape) != self.pair.shape:  # the user replaced its data
                continue
            target = layer.data if pred.z is None else layer.data[pred.z]
            target[...] = values
            layer.refresh()
        return False

    # after the loop (GUI thread) ---------------------------------------------------------------
    def finished(self, outcome: LiveOutcome) -> str | None:
        """Make an improved model the session's current model; the warning to show otherwise."""
        self.pair = None
        self.painted = None
        if outcome.path is not None:
            self.session.set_model(str(outcome.path))
            return None
        return outcome.warning

    def reset(self) -> None:
        """Forget the pair (after an error)."""
        self.pair = None
        self.painted = None
        self.trainer = None
