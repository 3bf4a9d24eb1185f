"""Keep Python's full garbage collections out of the moments a user watches.

A napari process holds hundreds of thousands of objects (Qt wrappers, vispy
visuals, torch and MONAI modules); a full (generation 2) collection walks them
all and, on 2 CPU cores, holds the interpreter for about 0.25 s, whichever
thread triggered it. Segmenting and adding layers allocate enough to trigger
one, during the run or just after it (measured: one in every first click
with attention layers).

:func:`settle` (called when a run starts) moves every object that exists to
CPython's permanent generation (``gc.freeze``): later collections walk only
objects created since, a few milliseconds. Objects are still freed by
reference counting; what a frozen object in a reference cycle needs is a
full walk, so :func:`thaw` (called when a layer is removed, the moment big
data can become cyclic garbage) gives the frozen objects back to the
collector, which then frees them at its next full collection.
"""

from __future__ import annotations

import gc
import threading

_LOCK = threading.Lock()


def settle() -> None:
    """Keep the objects that exist now out of later collections' walks."""
    with _LOCK:
        gc.freeze()


def thaw() -> None:
    """Give the kept objects back to the collector (their cycles can be freed again)."""
    with _LOCK:
        gc.unfreeze()


def kept() -> int:
    """How many objects are kept out of the walks now."""
    return gc.get_freeze_count()
