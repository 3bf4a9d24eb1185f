"""Images bigger than memory: segment a Zarr / OME-Zarr image block by block into a Zarr store.

``segment_zarr(src, dst, model)`` never holds the image or the labels in
memory: each block (``block`` x ``block`` pixels of one plane, one chunk of the
output) is read with a margin of ``halo`` pixels, segmented, and its core is
written as one chunk of ``dst``. Blocks are independent tasks: here one after
the other, or on a dask.distributed cluster (``client=``, see
:mod:`.cluster`).

* **Input**: a Zarr array, or an OME-Zarr image group (its full-resolution
  level, ``multiscales[0].datasets[0]``). The last two axes are y and x; any
  leading axes (t, z...) are planes segmented one by one. A channel axis of
  more than one channel is refused.
* **Intensities** are normalised with one value range for the whole image,
  estimated from a low-resolution level (or from windows spread over the
  image), so that blocks agree with each other.
* **Output**: an OME-Zarr (0.4, Zarr format 2) label image group with one level,
  ``0``, of the input's shape, chunks of one block, the labels of the model
  (class ids, or instance ids for instance models). Its ``multiscales`` and
  ``image-label`` attributes (the class names of a semantic model as label
  properties) are written by ome-zarr's writer, which checks them against the
  specification; the input's axes are kept, those of a plain array are named by
  its dimensions (``yx``, ``zyx``, ``tzyx``, ``tczyx``). Its ``napari-jointattn``
  attributes say what made it (model, source, block, halo, ``complete``).
* **Incomplete is visible**: ``complete`` is false until every block is
  written and (for instances) objects are joined across block edges. Each
  finished block leaves a marker (``.napari-jointattn/blocks/``), written after
  its chunk; a rerun with the same source, model and block size resumes with
  the blocks that have none. Cancel or a killed worker leaves exactly such a
  store.
* **Instances across block edges**: each block labels the objects of its
  block-with-margin; its core gets ids ``block_number * 2**20 + local id``.
  For every core-edge pixel whose object (in this block's own labelling)
  continues across the edge, the block records its id; once all blocks exist,
  those ids are paired with the ids the neighbour wrote on the other side; each
  connected component of the graph of pairs (scipy's ``connected_components``) is
  one object, with the component's smallest id, and the chunks concerned are
  relabelled. Ids are unique but not consecutive.
* **Runs sharing a scheduler**: each run's task keys hold a token of its own, so
  two runs at once (even into stores of the same name) never share a task.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInputError

ID_BITS = 20
MARKERS = ".napari-jointattn/blocks"
ATTRS_KEY = "napari-jointattn"


def _zarr():
    try:
        import zarr
    except ImportError as exc:
        raise BadInputError("Zarr images need the zarr package: pip install 'napari-jointattn[zarr]'") from exc
    return zarr


def is_zarr(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.name.lower().endswith(".zarr") or (p.is_dir() and any(
        (p / name).exists() for name in (".zarray", ".zgroup", "zarr.json")))


@dataclass
class ZarrInput:
    array: object  # a zarr.Array: level 0
    axes: list[dict]
    #: a small level (or None) for the intensity range
    preview: object | None


def open_input(path) -> ZarrInput:
    """The full-resolution array of a Zarr array or OME-Zarr image group (read only).

    ``path`` may also be an array (zarr, dask: anything with ``shape``,
    ``dtype`` and slicing), or a list of arrays from full to low resolution
    (a napari multiscale layer's levels).
    """
    axes: list[dict] = []
    preview = None
    if isinstance(path, ZarrInput):
        return path
    if not isinstance(path, (str, os.PathLike)):
        levels = list(path) if isinstance(path, (list, tuple)) or (
            hasattr(path, "__len__") and not hasattr(path, "shape")) else [path]
        array = levels[0]
        preview = next((lv for lv in levels[1:] if math.prod(lv.shape[-2:]) <= 4096 * 4096), None)
        return _checked(ZarrInput(array, axes, preview), "the image")
    zarr = _zarr()
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds
        raise BadInputError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from exc
    if isinstance(node, zarr.Array):
        array = node
    else:
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            raise BadInputError(f"{path}: a Zarr group without OME 'multiscales' metadata; "
                                "give the array inside it (e.g. {path}/0)")
        ms = multiscales[0]
        datasets = ms.get("datasets") or []
        if not datasets:
            raise BadInputError(f"{path}: OME 'multiscales' lists no datasets")
        array = node[datasets[0]["path"]]
        axes = list(ms.get("axes") or [])
        for d in datasets[1:]:
            level = node[d["path"]]
            if math.prod(level.shape[-2:]) <= 4096 * 4096:
                preview = level
                break
    return _checked(ZarrInput(array, axes, preview), str(path))


def _checked(src: ZarrInput, path: str) -> ZarrInput:
    array, axes = src.array, src.axes
    if array.ndim < 2:
        raise BadInputError(f"{path}: a {array.ndim}-D array is not an image")
    for i, ax in enumerate(axes[:-2]):
        if isinstance(ax, dict) and ax.get("type") == "channel" and array.shape[i] > 1:
            raise BadInputError(f"{path}: {array.shape[i]} channels on axis {i}; "
                                "segment one channel (e.g. write it to its own array)")
    if array.dtype.kind not in "uif" and array.dtype != bool:
        raise BadInputError(f"{path}: pixel type {array.dtype} is not an image")
    return src


def value_range(src: ZarrInput, percentiles: tuple[float, float], windows: int = 8, size: int = 256
                ) -> tuple[float, float]:
    """One (lo, hi) for the whole image: from a small level, else from windows spread over it."""
    from ..io.normalize import percentile_range

    a = src.array
    if src.preview is not None:
        sample = np.asarray(src.preview[...])
    else:
        h, w = a.shape[-2:]
        lead = a.shape[:-2]
        parts = []
        for k in range(windows * windows):
            plane = np.unravel_index(k % max(1, math.prod(lead)), lead) if lead else ()
            y = (k // windows) * max(0, h - size) // max(1, windows - 1)
            x = (k % windows) * max(0, w - size) // max(1, windows - 1)
            parts.append(np.asarray(a[plane + (slice(y, y + size), slice(x, x + size))]).ravel())
        sample = np.concatenate(parts)
    return percentile_range(sample, *percentiles)


@dataclass
class Block:
    number: int
    plane: tuple[int, ...]
    y0: int
    y1: int
    x0: int
    x1: int


def blocks_of(shape: tuple[int, ...], block: int) -> list[Block]:
    h, w = shape[-2:]
    out = []
    for plane in np.ndindex(*shape[:-2]) if len(shape) > 2 else [()]:
        for y0 in range(0, h, block):
            for x0 in range(0, w, block):
                out.append(Block(len(out), tuple(int(i) for i in plane), y0, min(h, y0 + block),
                                 x0, min(w, x0 + block)))
    return out


def _marker(dst: Path, b: Block) -> Path:
    return dst / MARKERS / f"{b.number}.npz"


@dataclass
class ZarrReport:
    path: Path
    blocks: int
    done_before: int = 0
    done: int = 0
    joined: int = 0
    seconds: float = 0.0
    complete: bool = False
    failed: list[tuple[int, str]] = field(default_factory=list)


def _settings(source: str, model, block: int, halo: int, tile: int, lo_hi) -> dict:
    return {"source": source, "model": getattr(model, "name", str(model)), "block": block, "halo": halo, "tile": tile,
            "value_range": [float(lo_hi[0]), float(lo_hi[1])]}


#: axis names of labels made from an array without axes of its own, by its number of dimensions
_PLAIN_AXES = {2: "yx", 3: "zyx", 4: "tzyx", 5: "tczyx"}


def _ome():
    """ome-zarr's OME-Zarr 0.4 format and metadata writer."""
    try:
        from ome_zarr import writer
        from ome_zarr.format import FormatV04
    except ImportError as exc:
        raise BadInputError("Zarr labels stores need the ome-zarr package: "
                            "pip install 'napari-jointattn[zarr]'") from exc
    return FormatV04(), writer


def _output_axes(src: ZarrInput) -> list:
    """The labels' OME axes: the input's, else names by dimensions; checked against the
    specification (2 to 5 axes, types in order) before anything is written."""
    fmt, _ = _ome()
    from ome_zarr.axes import KNOWN_AXES, Axes

    ndim = src.array.ndim
    if not src.axes and ndim not in _PLAIN_AXES:
        raise BadInputError(f"a {ndim}-D array: OME-Zarr labels have 2 to 5 axes; "
                            "segment a part of it (e.g. write it to its own array)")
    # a 0.4 axis may omit its type; ome-zarr's validation counts such axes as unknown
    axes = [{**ax, "type": KNOWN_AXES[ax["name"]]}
            if isinstance(ax, dict) and "type" not in ax and ax.get("name") in KNOWN_AXES else ax
            for ax in src.axes] or list(_PLAIN_AXES[ndim])
    if len(axes) != ndim:
        raise BadInputError(f"the image's OME metadata names {len(axes)} axes "
                            f"for {ndim} dimensions")
    try:
        return Axes(axes, fmt=fmt).to_list(fmt)
    except ValueError as exc:
        raise BadInputError(f"the image's axes cannot be written as OME-Zarr {fmt.version}: "
                            f"{exc}") from exc


def _write_ome_metadata(group, axes: list, model) -> None:
    """The OME-Zarr 0.4 attributes of a one-level label image, by ome-zarr's writer:
    ``multiscales`` and ``image-label`` (with the class names of a semantic model)."""
    fmt, writer = _ome()
    scale = [{"type": "scale", "scale": [1.0] * len(axes)}]
    level = {"path": "0", "coordinateTransformations": scale}
    writer.write_multiscales_metadata(group, [level], fmt=fmt, axes=axes, name="labels")
    label: dict = {"version": fmt.version}
    if not model.instances:
        label["properties"] = [{"label-value": value, "class": name}
                               for value, name in enumerate(model.classes) if value > 0]
    writer.add_metadata(group, {"image-label": label}, fmt=fmt)


def _prepare_output(dst: Path, src: ZarrInput, model, settings: dict, overwrite: bool):
    """Create ``dst`` or open it to resume; returns the labels array."""
    zarr = _zarr()
    axes = _output_axes(src)
    dtype = np.uint32 if model.instances else np.uint8
    if dst.exists():
        try:
            group = zarr.open_group(str(dst), mode="r+")
            mine = dict(group.attrs).get(ATTRS_KEY)
        except Exception:  # noqa: BLE001
            mine = None
        if mine is None and not overwrite:
            raise BadInputError(f"{dst} exists and was not written by napari-jointattn; "
                                "--overwrite / overwrite=True replaces it")
        if mine is not None and not overwrite:
            if mine.get("complete"):
                raise BadInputError(f"{dst} is complete (--overwrite / overwrite=True replaces it)")
            same = {k: mine.get(k) for k in settings if k != "value_range"} == \
                {k: v for k, v in settings.items() if k != "value_range"}
            if not same:
                raise BadInputError(f"{dst} is an incomplete store of another run (source, model or block "
                                    "size differ); --overwrite / overwrite=True starts it again")
            return group["0"], mine
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    group = zarr.open_group(str(dst), mode="w", zarr_format=2)
    block = settings["block"]
    shape = tuple(src.array.shape)
    chunks = (1,) * (len(shape) - 2) + (block, block)
    if model.instances and len(blocks_of(shape, block)) >= 2 ** (32 - ID_BITS):
        dtype = np.uint64
    labels = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
    _write_ome_metadata(group, axes, model)
    mine = {**settings, "complete": False, "classes": list(model.classes), "instances": bool(model.instances)}
    group.attrs[ATTRS_KEY] = mine
    (dst / MARKERS).mkdir(parents=True, exist_ok=True)
    return labels, mine


def segment_block(src_path, dst_path: str, b: Block, model, settings: dict, device: str = "auto",
                  threads: int | None = None) -> int:
    """Segment one block and write its chunk, then its marker; returns the block number.

    ``src_path``: the input's path (opened here: on a cluster worker), or a :class:`ZarrInput`.
    """
    from ..io.files import write_atomic

    if threads:
        import torch

        torch.set_num_threads(threads)
    from ..inference.segment import segment

    src = open_input(src_path)
    zarr = _zarr()
    labels_out = zarr.open_array(str(Path(dst_path) / "0"), mode="r+")
    halo = settings["halo"]
    h, w = src.array.shape[-2:]
    e = (max(0, b.y0 - halo), min(h, b.y1 + halo), max(0, b.x0 - halo), min(w, b.x1 + halo))
    region = np.asarray(src.array[b.plane + (slice(e[0], e[1]), slice(e[2], e[3]))])
    result = segment(region, model, device=device, tile=settings["tile"],
                     value_range=tuple(settings["value_range"]))
    local = result.labels
    cy, cx = b.y0 - e[0], b.x0 - e[2]
    core = local[cy:cy + b.y1 - b.y0, cx:cx + b.x1 - b.x0]
    edges: dict[str, np.ndarray] = {}
    if model.instances:
        if int(local.max()) >= 2 ** ID_BITS:
            raise BadInputError(f"block {b.number}: over {2 ** ID_BITS - 1} objects; use a smaller block")
        offset = np.uint64(b.number) << np.uint64(ID_BITS)
        ids = np.where(core > 0, core.astype(np.uint64) + offset, 0)
        # objects that continue across each edge of the core, by this block's own labelling
        ly, lx = local.shape
        sides = {"top": (cy - 1, slice(cx, cx + core.shape[1]), 0),
                 "bottom": (cy + core.shape[0], slice(cx, cx + core.shape[1]), -1),
                 "left": (slice(cy, cy + core.shape[0]), cx - 1, 0),
                 "right": (slice(cy, cy + core.shape[0]), cx + core.shape[1], -1)}
        for side, (r, c, inner) in sides.items():
            if side in ("top", "bottom"):
                if not 0 <= r < ly:
                    continue
                outside, inside, inner_ids = local[r, c], core[inner, :], ids[inner, :]
            else:
                if not 0 <= c < lx:
                    continue
                outside, inside, inner_ids = local[r, c], core[:, inner], ids[:, inner]
            cont = (inside > 0) & (outside == inside)
            edges[side + "_at"] = np.flatnonzero(cont).astype(np.int32)
            edges[side + "_id"] = inner_ids[cont].astype(np.uint64)
        core = ids
    labels_out[b.plane + (slice(b.y0, b.y1), slice(b.x0, b.x1))] = core.astype(labels_out.dtype)

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **edges)

    write_atomic(Path(dst_path) / MARKERS / f"{b.number}.npz", writer)
    return b.number


def _join_instances(dst: Path, labels, blocks: list[Block]) -> int:
    """Join ids of objects cut by block edges; relabel the chunks concerned. Returns the joins made.

    The ids that touch across block edges are the edges of a graph; each of its connected
    components becomes one object, with the smallest id of the component.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    h, w = labels.shape[-2:]
    mine, theirs = [], []
    for b in blocks:
        # per side: whether a neighbour lies beyond it, and the neighbour's line of pixels along it
        beyond = {"top": (b.y0 > 0, (b.y0 - 1, slice(b.x0, b.x1))),
                  "bottom": (b.y1 < h, (b.y1, slice(b.x0, b.x1))),
                  "left": (b.x0 > 0, (slice(b.y0, b.y1), b.x0 - 1)),
                  "right": (b.x1 < w, (slice(b.y0, b.y1), b.x1))}
        with np.load(_marker(dst, b)) as edges:
            for side, (neighbour, line) in beyond.items():
                if not neighbour or side + "_at" not in edges or edges[side + "_at"].size == 0:
                    continue
                at, ids = edges[side + "_at"], edges[side + "_id"]
                across = np.asarray(labels[b.plane + line])[at].astype(np.uint64)
                mine.append(ids[across > 0])
                theirs.append(across[across > 0])
    pairs = np.concatenate(mine + theirs) if mine else np.empty(0, np.uint64)
    if pairs.size == 0:
        return 0
    nodes, index = np.unique(pairs, return_inverse=True)
    half = index.size // 2  # this block's ids first, then the ids across the edge, pair by pair
    # one edge per pair of ids, however many pixels they touch at
    touching = np.unique(np.stack([index[:half], index[half:]], axis=1), axis=0)
    graph = coo_matrix((np.ones(len(touching), np.int8), (touching[:, 0], touching[:, 1])),
                       shape=(nodes.size,) * 2)
    n_objects, component = connected_components(graph, directed=False)
    # nodes are sorted, so the first node of each component holds its smallest id
    first = np.full(n_objects, nodes.size, np.int64)
    np.minimum.at(first, component, np.arange(nodes.size))
    roots = nodes[first[component]]
    moved = roots != nodes
    keys, values = nodes[moved], roots[moved]
    owners = {int(k) >> ID_BITS for k in keys}
    for b in blocks:
        if b.number not in owners:  # no id of this chunk is joined to a smaller one
            continue
        where = b.plane + (slice(b.y0, b.y1), slice(b.x0, b.x1))
        chunk = np.asarray(labels[where]).astype(np.uint64)
        pos = np.clip(np.searchsorted(keys, chunk), 0, len(keys) - 1)
        hit = keys[pos] == chunk
        if hit.any():
            chunk[hit] = values[pos[hit]]
            labels[where] = chunk.astype(labels.dtype)
    return int(nodes.size - n_objects)


def segment_zarr(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model="nuclei",
    *,
    block: int = 1920,
    halo: int = 64,
    tile: int = 512,
    device: str = "auto",
    overwrite: bool = False,
    client=None,
    threads: int | None = None,
    on_block: Callable[[int, int], "bool | None"] | None = None,
    source_name: str | None = None,
) -> ZarrReport:
    """Segment the Zarr / OME-Zarr image ``src`` into the OME-Zarr labels store ``dst``.

    See the module's notes. The default block, 1920, plus a 64-pixel margin on
    each side is 2048 pixels: exactly 5 x 5 windows of 512 at the network's
    25 % overlap, so a block wastes no window. ``client``: a ``distributed.Client`` whose workers
    segment the blocks (they must see both paths), each with ``threads`` torch
    threads if given. ``on_block(done, total)``
    after each block; returning ``False`` stops (the store stays incomplete,
    and a rerun resumes). ``overwrite``: replace a complete store or one of
    another run. ``src`` may also be an array or a list of levels (see
    :func:`open_input`; not with ``client``); ``source_name`` then names it in the
    store's attributes, and a rerun resumes only with the same name.
    """
    from ..models.model import load_model

    t0 = time.perf_counter()
    if not isinstance(block, int) or block < 64:
        raise BadInputError(f"block must be an integer of at least 64 pixels, got {block!r}")
    model = load_model(model)
    dst = Path(dst)
    is_path = isinstance(src, (str, os.PathLike))
    if is_path and dst.resolve() == Path(src).resolve():
        raise BadInputError(f"{dst}: the output store would replace the input")
    if client is not None and not is_path:
        raise BadInputError("on a cluster the input must be a Zarr path the workers can open")
    source = open_input(src)
    name = str(Path(src).resolve()) if is_path else (source_name or f"array {tuple(source.array.shape)}")
    lo_hi = value_range(source, model.normalization.percentiles)
    settings = _settings(name, model, block, halo, tile, lo_hi)
    labels, mine = _prepare_output(dst, source, model, settings, overwrite)
    settings["value_range"] = mine["value_range"]  # a resumed run keeps the first run's range
    blocks = blocks_of(tuple(source.array.shape), block)
    todo = [b for b in blocks if not _marker(dst, b).exists()]
    report = ZarrReport(dst, len(blocks), done_before=len(blocks) - len(todo))
    stopped = False

    def tell() -> bool:
        return on_block is None or on_block(report.done_before + report.done, len(blocks)) is not False

    if client is None:
        for b in todo:
            segment_block(source, str(dst), b, model, settings, device, threads)
            report.done += 1
            if not tell():
                stopped = True
                break
    else:
        from distributed import as_completed

        from ..errors import one_line

        ref = client.scatter(model, broadcast=True)
        # a scheduler hands a key already in use the existing task's result: keys are this run's
        run = uuid.uuid4().hex
        futures = {client.submit(segment_block, str(src), str(dst), b, ref, settings, device,
                                 threads, pure=False, key=f"block-{dst.name}-{run}-{b.number}"): b
                   for b in todo}
        for future in as_completed(futures):
            try:
                future.result()
                report.done += 1
            except Exception as exc:  # noqa: BLE001 - one block's failure is reported, the rest go on
                report.failed.append((futures[future].number, f"{type(exc).__name__}: {one_line(exc)}"))
            if not tell():
                stopped = True
                for f in futures:
                    f.cancel()
                break
    if not stopped and not report.failed and all(_marker(dst, b).exists() for b in blocks):
        if model.instances:
            report.joined = _join_instances(dst, labels, blocks)
        zarr = _zarr()
        group = zarr.open_group(str(dst), mode="r+")
        group.attrs[ATTRS_KEY] = {**dict(group.attrs)[ATTRS_KEY], "complete": True}
        with contextlib.suppress(OSError):
            shutil.rmtree(dst / MARKERS.split("/")[0])
        report.complete = True
    report.seconds = time.perf_counter() - t0
    return report


def store_state(dst: str | os.PathLike) -> dict | None:
    """The ``napari-jointattn`` attributes of a labels store (None: not one of ours)."""
    try:
        zarr = _zarr()
        return dict(zarr.open_group(str(dst), mode="r").attrs).get(ATTRS_KEY)
    except Exception:  # noqa: BLE001
        return None


def describe(report: ZarrReport) -> str:
    state = "complete" if report.complete else "INCOMPLETE (rerun to resume)"
    return (
        f"{report.done} of {report.blocks} blocks segmented in {report.seconds:.1f} s"
        + (f" ({report.done_before} done before)" if report.done_before else "")
        + (f", {report.joined} objects joined across block edges" if report.joined else "")
        + f"; store {state}")
