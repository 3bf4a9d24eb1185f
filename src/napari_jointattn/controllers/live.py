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
footprint of every *erase* stroke itself (:meth:`record_erase`), so erasing
anywhere marks background. :data:`WHOLE_SLICES`: every slice painted on counts
as a whole (0 = background), the painted pixels weighted higher, as *Weight
my corrections* does. The user's labels layer is only read, never written.
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
from .layers import layer_input
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
    """A copy of the annotations, taken on the GUI thread, for the trainer."""

    labels: np.ndarray
    mask: np.ndarray
    weights: np.ndarray | None
    painted_pixels: int


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
        self.trainer = None
        self.strokes = self.submitted = 0
        self.stop_event.clear()
        self._next_wanted.clear()
        self._pending = None
        self._uncertainty = {}
        self._visited = []
        self._value_range = None

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
        """Mark the pixels of a labels layer's ``events.paint`` value as painted; how many."""
        if self.painted is None:
            return 0
        before = int(self.painted.sum())
        for atom in atoms or ():
            if hasattr(atom, "slice_key"):  # mask-based edit: paint, fill, polygon
                region = self.painted[tuple(atom.slice_key)]
                if atom.mask is None:
                    region[...] = True
                else:
                    region[np.asarray(atom.mask, bool).reshape(region.shape)] = True
            else:  # (indices, old values, new values) from data_setitem
                self.painted[tuple(atom[0])] = True
        self.strokes += 1
        return int(self.painted.sum()) - before

    def record_erase(self, points, brush_size: float) -> int:
        """Mark the footprint of an erase stroke as painted (background); how many pixels were new.

        ``points``: the stroke's positions in data coordinates (the last two
        are rows and columns; for a stack the first is the slice). The brush is
        a disk of ``brush_size`` pixels across, as napari paints it; positions
        are joined by straight lines.
        """
        if self.painted is None or not len(points):
            return 0
        pts = np.asarray(points, float)
        shape = self.pair.shape
        plane_shape = shape[-2:]
        radius = math.floor(brush_size / 2) + 0.5
        r = math.floor(radius)
        dy, dx = np.mgrid[-r: r + 1, -r: r + 1]
        disk = dy ** 2 + dx ** 2 <= radius ** 2
        before = int(self.painted.sum())
        path = [pts[0]]
        for a, b in itertools.pairwise(pts):
            n = int(np.ceil(np.abs(b[-2:] - a[-2:]).max() / max(1.0, radius / 2)))
            path += [a + (b - a) * t for t in np.linspace(0, 1, n + 1)[1:]]
        for p in path:
            cy, cx = round(float(p[-2])), round(float(p[-1]))
            if len(shape) == 3:
                z = round(float(p[0]))
                if not 0 <= z < shape[0]:
                    continue
                plane = self.painted[z]
            else:
                plane = self.painted
            y0, x0 = max(cy - r, 0), max(cx - r, 0)
            y1, x1 = min(cy + r + 1, plane_shape[0]), min(cx + r + 1, plane_shape[1])
            if y0 >= y1 or x0 >= x1:
                continue
            plane[y0:y1, x0:x1] |= disk[y0 - (cy - r): y1 - (cy - r), x0 - (cx - r): x1 - (cx - r)]
        self.strokes += 1
        return int(self.painted.sum()) - before

    def snapshot(self) -> Snapshot | None:
        """A copy of the annotations as the chosen rule counts them (GUI thread; one array copy).

        None when nothing has been painted since live mode started.
        """
        if self.pair is None or not self.painted.any():
            return None
        if self.pair.labels_name not in self.viewer.layers:
            raise BadInputError(f"layer {self.pair.labels_name!r} no longer exists")
        labels = np.array(self.viewer.layers[self.pair.labels_name].data, copy=True)
        if labels.shape != self.pair.shape:
            raise BadInputError(f"labels {self.pair.labels_name!r} now have shape {labels.shape}, "
                                f"the image {self.pair.shape}")
        painted = self.painted.copy()
        mask = self.annotated_mask(painted)
        if self.annotated == PAINTED:
            return Snapshot(labels, mask, None, int(painted.sum()))
        weights = np.where(painted, 1.0 + CORRECTION_EXTRA, 1.0).astype(np.float32)
        return Snapshot(labels, mask, weights, int(painted.sum()))

    def annotated_mask(self, painted: np.ndarray | None = None) -> np.ndarray:
        """True where the chosen rule counts a pixel as annotated: the painted pixels, or the
        whole slices painted on."""
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
            self.trainer.submit([self.pair.image], [snap.labels], masks=[snap.mask],
                                weights=None if snap.weights is None else [snap.weights])

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
