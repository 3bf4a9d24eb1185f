"""What the docks of one viewer share: the current model, the tile size, loaded models.

One :class:`Session` per viewer (:func:`session_for`). The Segment dock, the
Fine-tune dock and rollback all read and write it, so handing a new model
over does not need the other dock to be open. Models are loaded (and cached
by file modification time) under a lock, from any thread; the cache holds the
current model and the :data:`KEPT_MODELS` used last besides it. :meth:`Session.warm`
loads a model and runs its first forward pass so the first click does not pay
for it. No Qt here.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
from psygnal import Signal

from ..engine.errors import BadInputError
from ..engine.models.metadata import PRESET_DIR, saved_models
from ..engine.models.model import MODEL_SUFFIX, load_model
from ..engine.models.presets import PRESETS

DEFAULT_TILE = 512
#: side of the image the warm-up runs (at most one tile)
WARM_SIDE = 512
#: loaded models kept besides the current one (least recently used dropped first); each may
#: hold a copy of its network on every device it ran on
KEPT_MODELS = 2


def preset_choices() -> list[tuple[str, str]]:
    """(label, key) for the presets whose weights are installed."""
    return [(f"{name} (preset)", name) for name in PRESETS
            if (PRESET_DIR / f"{name}{MODEL_SUFFIX}").is_file()]


def default_model() -> str | None:
    """The first preset with bundled weights (None when there is none)."""
    presets = preset_choices()
    return presets[0][1] if presets else None


def _stamp(key: str) -> float:
    try:
        path = Path(key)
        return path.stat().st_mtime if path.is_file() else 0.0
    except OSError:
        return 0.0


class Session:
    """Per-viewer shared state: current model key, tile, extra model files, loaded models.

    ``model_changed`` is emitted (in the caller's thread) with the new key
    whenever :meth:`set_model` changes the current model.
    """

    model_changed = Signal(str)

    def __init__(self) -> None:
        self.model_key: str | None = None
        self.tile: int = DEFAULT_TILE
        self.extra_models: list[str] = []
        #: key -> (file stamp, model), least recently used first
        self._cache: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._lock = threading.RLock()
        self._warm: set[tuple] = set()

    # the current model -------------------------------------------------------
    def current_model(self) -> str | None:
        """The model the next Segment uses: the one set last, else the first preset."""
        return self.model_key or default_model()

    def set_model(self, key: str) -> None:
        """Make ``key`` (a preset, a saved model's path, a model file) the current model."""
        key = str(key)
        if Path(key).is_file() and key not in [k for _, k in self.model_choices()]:
            self.extra_models.append(key)
        if key != self.model_key:
            self.model_key = key
            self.model_changed.emit(key)

    def add_model_file(self, path: str) -> str:
        """Check a model file (raises :class:`BadInputError`), list it and make it current."""
        self.model(path)
        if path not in self.extra_models:
            self.extra_models.append(path)
        self.set_model(path)
        return path

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, key) for presets with weights, saved models, and added model files."""
        out = preset_choices()
        out += [(path.stem, str(path)) for path in saved_models()]
        keys = {k for _, k in out}
        out += [(Path(p).name, p) for p in self.extra_models if p not in keys]
        return out

    # loaded models -------------------------------------------------------------
    def model(self, key: str):
        """The loaded model for ``key``, cached until its file changes (any thread).

        At most the current model and :data:`KEPT_MODELS` others stay loaded; a model
        dropped from the cache (or replaced by a newer file) gives up its per-device
        copies of the network at once. A run still using it keeps working.
        """
        if not key:
            raise BadInputError("choose a model (no presets or saved models found)")
        with self._lock:
            stamp = _stamp(key)
            cached = self._cache.get(key)
            if cached is None or cached[0] != stamp:
                model = load_model(key)
                if cached is not None:
                    _release_copies(cached[1])
                self._cache[key] = (stamp, model)
            self._cache.move_to_end(key)
            self._evict()
            return self._cache[key][1]

    def _evict(self) -> None:
        current = self.current_model()
        others = [k for k in self._cache if k != current]  # least recently used first
        for key in others[: max(0, len(others) - KEPT_MODELS)]:
            _release_copies(self._cache.pop(key)[1])
            self._warm = {token for token in self._warm if token[0] != key}

    def is_warm(self, key: str | None = None, tile: int | None = None, device: str = "auto") -> bool:
        """Whether :meth:`warm` has run for this model, tile and device."""
        key = key or self.current_model()
        return (key, _stamp(key), int(tile or self.tile), device) in self._warm

    def warm(self, key: str | None, tile: int | None = None, device: str = "auto") -> bool:
        """Load ``key`` and run one tile through it with attention maps (worker thread).

        The first forward pass of a network is several times slower than the
        next (kernel set-up, lazy imports); doing it here, when a dock opens or
        the model changes, keeps it out of the user's first click. Returns
        False when the model cannot be loaded (the click reports why).
        """
        key = key or self.current_model()
        tile = int(tile or self.tile)
        if not key:
            return False
        token = (key, _stamp(key), tile, device)
        from ..engine.inference.segment import segment

        with self._lock:  # one warm-up at a time; a click waits for it rather than racing it
            if token in self._warm:
                return True
            try:
                model = self.model(key)
            except BadInputError:
                return False
            side = min(tile, WARM_SIDE)
            shape = (side, side) if model.in_channels == 1 else (side, side, model.in_channels)
            noise = np.random.default_rng(0).random(shape, dtype=np.float32)
            channel_axis = None if model.in_channels == 1 else 2
            segment(noise, model, tile=tile, device=device, attention=True, channel_axis=channel_axis)
            from ..engine.inference.runtime import cpu_runtime

            if cpu_runtime() == "onnxruntime":  # opt-in: its graph is exported and loaded here, not at the click
                segment(noise, model, tile=tile, device=device, attention=False, channel_axis=channel_axis)
            _warm_layers()
            self._warm.add(token)
        return True


def _release_copies(model) -> None:
    """Drop the copies of ``model``'s network that inference made on any device."""
    import torch

    from ..engine.inference.placement import release

    devices = ["cpu", "mps", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    for device in devices:
        release(model.net, device)


def _warm_layers() -> None:
    """Build a tiny Labels layer once: napari imports its features table (pandas) on first use."""
    from napari.layers import Labels

    Labels(np.zeros((2, 2), np.int32))


_SESSIONS: weakref.WeakKeyDictionary[object, Session] = weakref.WeakKeyDictionary()


def _underlying(viewer):
    return getattr(viewer, "__wrapped__", viewer)


def session_for(viewer) -> Session:
    """The session of ``viewer`` (created on first use; the same for napari's viewer proxies)."""
    target = _underlying(viewer)
    session = _SESSIONS.get(target)
    if session is None:
        session = _SESSIONS[target] = Session()
    return session
